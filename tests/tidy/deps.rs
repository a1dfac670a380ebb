//! Each crate's rule of dependency, checked: what every workspace crate's `Cargo.toml` may name
//! under `[dependencies]`, and what `saveset`'s whole normal dependency closure must not reach.
//! The rules are written out in ARCHITECTURE.md ("Dependency rules (tested)").

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

/// What one crate's `[dependencies]` may name.
enum Rule {
    /// Only these packages.
    Only(&'static [&'static str]),
    /// Anything but these packages.
    Never(&'static [&'static str]),
}

/// A crate directory, whether it must exist, and its rule. Every workspace member has one, so a
/// new crate states its rule when it joins.
struct CrateRule {
    dir: &'static str,
    /// A crate still on its way (on another branch): its rule applies once the directory exists.
    optional: bool,
    rule: Rule,
}

const RULES: &[CrateRule] = &[
    CrateRule { dir: "sys", optional: false, rule: Rule::Only(&["libc"]) },
    CrateRule {
        dir: "proto",
        optional: false,
        rule: Rule::Only(&["prost", "tonic", "tonic-prost"]),
    },
    CrateRule {
        dir: "protocol",
        optional: true,
        rule: Rule::Never(&[
            "tokio",
            "tonic",
            "prost",
            "stillpoint-proto",
            "stillpoint-core",
            "redb",
            "rustls",
            "tokio-rustls",
            "object_store",
            "libc",
        ]),
    },
    CrateRule {
        dir: "saveset",
        optional: false,
        rule: Rule::Never(&[
            "tonic",
            "prost",
            "rustls",
            "tokio-rustls",
            "stillpoint-core",
            "stillpoint-proto",
            "stillpoint-listener",
            "stillpoint-agent",
        ]),
    },
    CrateRule {
        dir: "core",
        optional: false,
        rule: Rule::Never(&[
            "stillpoint-listener",
            "stillpoint-agent",
            "stillpoint-saveset",
            "backupctl",
        ]),
    },
    CrateRule {
        dir: "listener",
        optional: false,
        rule: Rule::Never(&["stillpoint-agent", "backupctl"]),
    },
    CrateRule {
        dir: "agent",
        optional: false,
        rule: Rule::Never(&["stillpoint-listener", "backupctl"]),
    },
    CrateRule {
        dir: "backupctl",
        optional: false,
        rule: Rule::Never(&["stillpoint-agent", "stillpoint-listener"]),
    },
    // Notifications are shared by the listener and backupctl, and speak SMTP and HTTP only.
    CrateRule {
        dir: "notify",
        optional: false,
        rule: Rule::Never(&["stillpoint-listener", "stillpoint-agent", "backupctl", "tonic"]),
    },
    // The end-to-end tests drive every binary and library.
    CrateRule { dir: "tests", optional: false, rule: Rule::Never(&[]) },
];

fn root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

fn read_toml(path: &Path) -> toml::Table {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    text.parse().unwrap_or_else(|e| panic!("parse {}: {e}", path.display()))
}

/// The packages a manifest's `[dependencies]` (and any `[target.*.dependencies]`) name, by
/// package name (a renamed dependency counts as the package it renames).
fn normal_dependencies(manifest: &toml::Table) -> BTreeSet<String> {
    let mut tables = vec![manifest.get("dependencies")];
    if let Some(targets) = manifest.get("target").and_then(|t| t.as_table()) {
        tables.extend(targets.values().map(|t| t.get("dependencies")));
    }
    let mut names = BTreeSet::new();
    for table in tables.into_iter().flatten().filter_map(|t| t.as_table()) {
        for (key, spec) in table {
            let package = spec.get("package").and_then(|p| p.as_str()).unwrap_or(key);
            names.insert(package.to_string());
        }
    }
    names
}

#[test]
fn every_crate_keeps_its_rule_of_dependency() {
    let members: Vec<String> = read_toml(&root().join("Cargo.toml"))["workspace"]["members"]
        .as_array()
        .expect("the root Cargo.toml lists workspace members")
        .iter()
        .map(|m| m.as_str().expect("a member is a path").to_string())
        .collect();
    let unruled: Vec<_> =
        members.iter().filter(|m| !RULES.iter().any(|r| r.dir == m.as_str())).collect();
    assert!(unruled.is_empty(), "workspace crates without a dependency rule here: {unruled:?}");

    let mut broken = Vec::new();
    for rule in RULES {
        let manifest = root().join(rule.dir).join("Cargo.toml");
        if rule.optional && !manifest.exists() {
            continue;
        }
        let deps = normal_dependencies(&read_toml(&manifest));
        let bad: Vec<&String> = match rule.rule {
            Rule::Only(allowed) => deps.iter().filter(|d| !allowed.contains(&d.as_str())).collect(),
            Rule::Never(banned) => deps.iter().filter(|d| banned.contains(&d.as_str())).collect(),
        };
        if !bad.is_empty() {
            broken.push(format!("{}/Cargo.toml depends on {bad:?}", rule.dir));
        }
    }
    assert!(broken.is_empty(), "dependency rules broken (see ARCHITECTURE.md):\n{broken:#?}");
}

/// The package names in `saveset`'s normal dependency closure on this host, as `cargo tree`
/// resolves it from the lock file; `prune` cuts one dependency's subtree off.
fn saveset_closure(prune: Option<&str>) -> BTreeSet<String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(root()).args([
        "tree",
        "--locked",
        "-p",
        "stillpoint-saveset",
        "-e",
        "normal",
        "--prefix",
        "none",
        "--format",
        "{p}",
    ]);
    if let Some(prune) = prune {
        cmd.args(["--prune", prune]);
    }
    let out = cmd.output().expect("run cargo tree");
    assert!(out.status.success(), "cargo tree failed: {}", String::from_utf8_lossy(&out.stderr));
    let names: BTreeSet<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect();
    assert!(names.contains("stillpoint-sys"), "cargo tree listed no stillpoint-sys: {names:?}");
    names
}

/// `saveset` is a format and a copier: no gRPC stack, and no network stack at all except the S3
/// back end's HTTPS client (`object_store`), which is the only way hyper and rustls may come in.
#[test]
fn saveset_reaches_no_grpc_and_no_network_but_s3() {
    let grpc = ["tonic", "prost", "stillpoint-core", "stillpoint-proto"];
    let all = saveset_closure(None);
    let found: Vec<_> = grpc.iter().filter(|p| all.contains(**p)).collect();
    assert!(found.is_empty(), "saveset's dependencies reach the gRPC stack: {found:?}");

    let network = ["hyper", "h2", "rustls", "tokio-rustls", "reqwest", "tower", "tonic"];
    let without_s3 = saveset_closure(Some("object_store"));
    let found: Vec<_> = network.iter().filter(|p| without_s3.contains(**p)).collect();
    assert!(found.is_empty(), "saveset reaches {found:?} other than through object_store (S3)");
}
