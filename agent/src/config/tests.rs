//! Config parsing and validation.

use super::*;

const FULL: &str = r#"
server = "srv-a"
listen = "127.0.0.1:7501"
volumes = ["data", "logs"]
[tls]
ca = "/nonexistent/ca.pem"
cert = "/nonexistent/srv-a.pem"
key = "/nonexistent/srv-a.key"
[[quiescer]]
kind = "exec"
name = "app"
pre_freeze = ["/bin/sh", "-c", "true"]
post_thaw = ["/bin/sh", "-c", "true"]
[[quiescer]]
kind = "fsfreeze"
mount = "/"
[snapshot]
provider = "mock-san"
array = "/nonexistent/array"
"#;

#[test]
fn parses_every_field_with_defaults() {
    let c = Config::parse(FULL).unwrap();
    assert_eq!(c.server, "srv-a");
    assert_eq!(c.max_lease_ms, 60_000);
    assert_eq!(c.quiescers.len(), 2);
    assert!(matches!(&c.quiescers[0], QuiescerConfig::Exec { timeout_ms: 30_000, .. }));
    assert_eq!(c.quiescers[1].name(), "fsfreeze /");
    assert!(matches!(c.snapshot, SnapshotConfig::MockSan { snapshot_delay_ms: 0, .. }));
    assert_eq!(c.state_dir, Path::new("/var/lib/stillpoint-agent"));
}

#[test]
fn unknown_fields_are_refused_with_their_name() {
    let text = FULL.replace("name = \"app\"", "name = \"app\"\nnmae = \"x\"");
    let err = Config::parse(&text).unwrap_err();
    assert!(err.contains("nmae"), "{err}");
    let err =
        Config::parse(&FULL.replace("provider = \"mock-san\"", "provider = \"zfs\"")).unwrap_err();
    assert!(err.contains("zfs"), "{err}");
    let err = Config::parse(&format!("colour = 1\n{FULL}")).unwrap_err();
    assert!(err.contains("colour"), "{err}");
}

#[test]
fn validate_reports_every_problem_naming_the_field() {
    let text = FULL
        .replace("srv-a\"\nlisten", "../a\"\nlisten")
        .replace("127.0.0.1:7501", "nowhere")
        .replace("volumes = [\"data\", \"logs\"]", "volumes = []\nmax_lease_ms = 10")
        .replace("mount = \"/\"", "mount = \"relative\"")
        .replace(
            "[snapshot]",
            "[[quiescer]]\nkind = \"stop\"\nname = \"app2\"\npidfile = \"app.pid\"\n[snapshot]",
        )
        .replace("server = \"../a\"", "server = \"../a\"\nstate_dir = \"state\"");
    let problems = Config::parse(&text).unwrap().problems();
    for field in [
        "server:",
        "listen:",
        "max_lease_ms:",
        "volumes:",
        "tls.ca:",
        "tls.cert:",
        "tls.key:",
        "quiescer[1].mount:",
        "quiescer[2].pidfile:",
        "state_dir:",
        "snapshot.array:",
    ] {
        assert!(problems.iter().any(|p| p.starts_with(field)), "no {field} in {problems:#?}");
    }
    let err = Config::parse(&text).unwrap().validate().unwrap_err().to_string();
    assert!(err.contains(&format!("{} problem(s)", problems.len())), "{err}");
}

#[test]
fn btrfs_snapshot_dir_on_a_frozen_filesystem_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("data")).unwrap();
    let text = format!(
        r#"
server = "srv-a"
listen = "127.0.0.1:7501"
volumes = ["{d}/data"]
tls = {{ ca = "/x", cert = "/x", key = "/x" }}
[[quiescer]]
kind = "fsfreeze"
mount = "{d}"
[snapshot]
provider = "btrfs"
snapshot_dir = "{d}"
"#,
        d = dir.path().display()
    );
    let problems = Config::parse(&text).unwrap().problems();
    assert!(
        problems.iter().any(|p| p.starts_with("snapshot.snapshot_dir:") && p.contains("deadlock")),
        "{problems:#?}"
    );
}

#[test]
fn every_agent_example_in_deploy_parses() {
    let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    let mut seen = 0;
    for entry in std::fs::read_dir(&deploy).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if name.starts_with("agent-") && name.ends_with(".example.toml") {
            Config::load(&path).unwrap();
            seen += 1;
        }
    }
    assert!(seen >= 3, "only {seen} agent examples in {}", deploy.display());
}
