//! The drill's pure parts: its config (parsing, refusals, problems), filesystem recognition,
//! the report's verdict and rendering.

use super::config::{CheckKind, DrillConfig, DEFAULT_TIMEOUT_S};
use super::fs::{detect, FsType, PROBE_BYTES};
use super::report::{tail, CheckReport, DrillReport, Outcome, ServerReport, VolumeReport};

fn check_config(text: &str) -> Result<DrillConfig, String> {
    let config = DrillConfig::parse(text)?;
    match config.problems() {
        p if p.is_empty() => Ok(config),
        p => Err(p.join("; ")),
    }
}

#[test]
fn a_full_drill_file_parses() {
    let config = check_config(
        r#"
        timeout_s = 120
        [[server]]
        name = "db1"
        [[server.check]]
        kind = "fsck"
        [[server.check]]
        kind = "postgres"
        volume = "data"
        data_dir = "pg/data"
        query = "SELECT 1 FROM marks LIMIT 1"
        timeout_s = 30
        [[server.check]]
        kind = "sqlite"
        path = "app/app.db"
        [[server.check]]
        kind = "command"
        command = ["/usr/local/bin/check-app", "--quick"]
        mount = false
        [[server]]
        name = "db2"
        [[server.check]]
        kind = "mysql"
        data_dir = "mariadb"
        "#,
    )
    .unwrap();
    assert_eq!(config.timeout_s, 120);
    let db1 = &config.servers[0];
    assert_eq!(db1.checks.len(), 4);
    assert_eq!(db1.checks[0].kind, CheckKind::Fsck);
    let CheckKind::Postgres(pg) = &db1.checks[1].kind else { panic!("{:?}", db1.checks[1]) };
    assert_eq!(pg.data_dir.to_str(), Some("pg/data"));
    assert_eq!(pg.os_user, "postgres");
    assert_eq!(pg.bin_dir.to_str(), Some("/usr/lib/postgresql/15/bin"));
    assert_eq!(db1.checks[1].volume.as_deref(), Some("data"));
    assert_eq!(db1.checks[1].timeout(&config).as_secs(), 30);
    assert_eq!(db1.checks[0].timeout(&config).as_secs(), 120);
    assert!(!db1.checks[3].kind.mounts(), "mount = false");
    assert!(!db1.checks[0].kind.mounts(), "fsck reads the image file");
    let CheckKind::Mysql(my) = &config.servers[1].checks[0].kind else { panic!() };
    assert_eq!(my.os_user, "mysql");
}

#[test]
fn an_empty_file_drills_every_server_with_the_default_timeout() {
    let config = check_config("").unwrap();
    assert!(config.servers.is_empty());
    assert_eq!(config.timeout_s, DEFAULT_TIMEOUT_S);
}

#[test]
fn unknown_fields_and_kinds_are_refused_by_name() {
    let typo = "[[server]]\nname = \"db1\"\n[[server.check]]\nkind = \"postgres\"\ndata_dir = \"d\"\nquerry = \"x\"\n";
    let e = check_config(typo).unwrap_err();
    assert!(e.contains("querry"), "{e}");
    let plain = "[[server]]\nname = \"db1\"\n[[server.check]]\nkind = \"fsck\"\npath = \"x\"\n";
    let e = check_config(plain).unwrap_err();
    assert!(e.contains("fsck check: unknown field `path`"), "{e}");
    let kind = "[[server]]\nname = \"db1\"\n[[server.check]]\nkind = \"oracle\"\n";
    let e = check_config(kind).unwrap_err();
    assert!(e.contains("\"oracle\" is not one of"), "{e}");
    let none = "[[server]]\nname = \"db1\"\n[[server.check]]\nvolume = \"v\"\n";
    assert!(check_config(none).unwrap_err().contains("needs `kind"));
    let top = "timout_s = 3\n";
    assert!(check_config(top).unwrap_err().contains("timout_s"));
}

#[test]
fn problems_are_listed_all_at_once_by_field() {
    let e = check_config(
        r#"
        timeout_s = 0
        [[server]]
        name = "db1"
        [[server.check]]
        kind = "postgres"
        data_dir = "../etc"
        os_user = "root"
        [[server.check]]
        kind = "sqlite"
        path = "/abs/app.db"
        [[server.check]]
        kind = "command"
        command = []
        timeout_s = 0
        [[server]]
        name = "db1"
        "#,
    )
    .unwrap_err();
    for want in [
        "timeout_s: must be at least 1 second",
        "server[0].check[0] (postgres).data_dir",
        "server[0].check[0] (postgres).os_user: PostgreSQL refuses to run as root",
        "server[0].check[1] (sqlite).path",
        "server[0].check[2] (command).command: needs at least the program",
        "server[0].check[2] (command).timeout_s",
        "server[1].name: server \"db1\" is named twice",
    ] {
        assert!(e.contains(want), "missing {want:?} in {e}");
    }
}

#[test]
fn filesystems_are_recognised_by_their_superblock() {
    let mut head = vec![0u8; PROBE_BYTES];
    assert_eq!(detect(&head), None);
    head[..4].copy_from_slice(b"XFSB");
    assert_eq!(detect(&head), Some(FsType::Xfs));
    head[..4].fill(0);
    head[0x10040..0x10048].copy_from_slice(b"_BHRfS_M");
    assert_eq!(detect(&head), Some(FsType::Btrfs));
    head[0x10040..0x10048].fill(0);
    head[0x438..0x43a].copy_from_slice(&[0x53, 0xef]);
    assert_eq!(detect(&head), Some(FsType::Ext));
    assert_eq!(detect(b"XF"), None, "a short image is no filesystem");
}

fn report(checks: Vec<(&str, Outcome)>, restore_error: Option<&str>) -> DrillReport {
    let server = ServerReport {
        server: "db1".into(),
        volumes: vec![VolumeReport {
            volume: "data".into(),
            image: "/s/db1/data.img".into(),
            size: 100,
            bytes_written: 10,
            duration_ms: 5,
            error: restore_error.map(str::to_string),
        }],
        checks: checks
            .into_iter()
            .map(|(check, outcome)| CheckReport {
                check: check.into(),
                volume: "data".into(),
                outcome,
                duration_ms: 1500,
                detail: format!("{check} said so"),
                output: if outcome == Outcome::Failed { vec!["last line".into()] } else { vec![] },
            })
            .collect(),
    };
    let passed = server.passed();
    DrillReport {
        backup: "b-1".into(),
        group: Some("g".into()),
        repository: "/repo".into(),
        complete: true,
        started_unix_ms: 0,
        duration_ms: 61_000,
        scratch: "/s".into(),
        scratch_kept: false,
        servers: vec![server],
        passed,
    }
}

#[test]
fn a_drill_passes_only_when_every_restore_and_check_passed() {
    let ok = report(vec![("fsck", Outcome::Passed), ("postgres", Outcome::Passed)], None);
    assert!(ok.passed && ok.failures().is_empty());
    let text = ok.render();
    assert!(
        text.starts_with("drill of backup b-1 (group g) from /repo: PASSED in 1m01s"),
        "{text}"
    );
    assert!(text.contains("postgres said so"), "{text}");

    let bad = report(vec![("fsck", Outcome::Passed), ("postgres", Outcome::Failed)], None);
    assert!(!bad.passed);
    assert_eq!(bad.failures(), ["db1: postgres check"]);
    let text = bad.render();
    assert!(text.contains("FAILED") && text.contains("    | last line"), "{text}");

    let damaged = report(vec![("sqlite", Outcome::Skipped)], Some("damaged chunk"));
    assert!(!damaged.passed, "a skipped check is not a pass");
    assert_eq!(damaged.failures(), ["db1: restore of data"]);
}

#[test]
fn the_report_round_trips_through_json() {
    let r = report(vec![("postgres", Outcome::Failed)], None);
    let json = serde_json::to_string(&r).unwrap();
    assert!(json.contains(r#""outcome":"failed""#), "{json}");
    let back: DrillReport = serde_json::from_str(&json).unwrap();
    assert_eq!(back, r);
}

#[test]
fn a_tail_keeps_the_last_non_empty_lines() {
    let text = "a\n\nb\nc\n\n";
    assert_eq!(tail(text, 2), ["b", "c"]);
    assert_eq!(tail(text, 10), ["a", "b", "c"]);
    let long = "x".repeat(400);
    assert_eq!(tail(&long, 1)[0].chars().count(), 301);
}

#[test]
fn the_example_drill_file_parses_without_problems() {
    let config = check_config(include_str!("../../../../deploy/drill.example.toml")).unwrap();
    let kinds: Vec<&str> =
        config.servers.iter().flat_map(|s| &s.checks).map(|c| c.kind.name()).collect();
    assert_eq!(kinds, ["mount", "fsck", "postgres", "sqlite", "command", "mysql"]);
}

#[test]
fn a_missing_tool_is_named_with_its_package() {
    let e = super::exec::find("/nonexistent/bin/pg_amcheck").unwrap_err();
    assert!(e.detail.starts_with("pg_amcheck is not installed (no /nonexistent/bin/pg_amcheck)"));
    assert!(e.detail.contains("install postgresql-15"), "{e}");
    let e = super::exec::find("mariadb-check-not-here").unwrap_err();
    assert!(e.detail.contains("mariadb-check-not-here is not installed"), "{e}");
    assert_eq!(super::exec::package_of("xfs_repair"), "xfsprogs");
    assert!(super::exec::find("sh").is_ok());
}

fn volumes(
    list: &[(&str, &str)],
) -> Vec<(stillpoint_saveset::ManifestId, stillpoint_saveset::VolumeSummary)> {
    list.iter()
        .enumerate()
        .map(|(i, (server, volume))| {
            let meta = stillpoint_saveset::VolumeMeta {
                backup: "b-1".into(),
                server: server.to_string(),
                volume: volume.to_string(),
            };
            let summary = stillpoint_saveset::VolumeSummary {
                meta,
                size: 1,
                chunk_size: 4096,
                created_unix_ms: 1,
            };
            (stillpoint_saveset::ManifestId([i as u8; 32]), summary)
        })
        .collect()
}

#[test]
fn the_plan_takes_the_files_servers_or_every_server_and_checks_volume_names() {
    let held = volumes(&[("db1", "data"), ("db1", "wal"), ("web", "root")]);
    let held: Vec<_> = held.iter().collect();
    let every = super::plan(&check_config("").unwrap(), &held).unwrap();
    let names: Vec<&str> = every
        .iter()
        .map(|(s, c)| {
            assert!(c.is_empty());
            s.as_str()
        })
        .collect();
    assert_eq!(names, ["db1", "web"]);

    // A server the backup lacks stays, for the report to fail; a check on a volume it lacks,
    // or without a volume on a server with two, is a mistake in the file.
    let config = check_config("[[server]]\nname = \"gone\"\n[[server]]\nname = \"web\"\n[[server.check]]\nkind = \"mount\"\n").unwrap();
    let plan = super::plan(&config, &held).unwrap();
    assert_eq!(plan.iter().map(|(s, _)| s.as_str()).collect::<Vec<_>>(), ["gone", "web"]);
    let unnamed =
        check_config("[[server]]\nname = \"db1\"\n[[server.check]]\nkind = \"fsck\"\n").unwrap();
    let e = super::plan(&unnamed, &held).unwrap_err().to_string();
    assert!(e.contains("server db1's fsck check must say `volume =` (it has data, wal)"), "{e}");
    let wrong = check_config(
        "[[server]]\nname = \"db1\"\n[[server.check]]\nkind = \"fsck\"\nvolume = \"logs\"\n",
    )
    .unwrap();
    let e = super::plan(&wrong, &held).unwrap_err().to_string();
    assert!(e.contains("server db1 has no volume logs in the backup (it has data, wal)"), "{e}");
}
