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
        Config::parse(&FULL.replace("provider = \"mock-san\"", "provider = \"nfs\"")).unwrap_err();
    assert!(err.contains("nfs"), "{err}");
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

/// The saveset problems of `FULL` with `section` appended as its `[saveset]` table.
fn saveset_problems(section: &str) -> Vec<String> {
    let config = Config::parse(&format!("{FULL}[saveset]\n{section}")).unwrap();
    assert!(config.saveset.is_some());
    config.problems().into_iter().filter(|p| p.starts_with("saveset")).collect()
}

#[test]
fn saveset_is_optional_and_its_mistakes_are_reported_by_field() {
    assert!(Config::parse(FULL).unwrap().saveset.is_none());
    let dir = tempfile::tempdir().unwrap();
    let pass = dir.path().join("pass");
    std::fs::write(&pass, "words\n").unwrap();
    let empty = dir.path().join("empty");
    std::fs::write(&empty, "\n").unwrap();

    let good = format!("repository = \"/backup/saveset\"\npassphrase_file = {pass:?}\n");
    assert_eq!(saveset_problems(&good), Vec::<String>::new());
    let s3 = format!("repository = \"s3://bucket/stillpoint\"\npassphrase_file = {pass:?}\n");
    assert_eq!(saveset_problems(&s3), Vec::<String>::new());
    let config = Config::parse(&format!("{FULL}[saveset]\n{good}")).unwrap();
    assert_eq!(config.saveset.as_ref().unwrap().copy_delay_ms_per_mib, 0);

    for (section, expected) in [
        (
            format!("repository = \"relative/repo\"\npassphrase_file = {pass:?}\n"),
            "saveset.repository: relative/repo is not an absolute path",
        ),
        (format!("repository = \"\"\npassphrase_file = {pass:?}\n"), "saveset.repository: empty"),
        (format!("repository = \"s3://\"\npassphrase_file = {pass:?}\n"), "saveset.repository: "),
        ("repository = \"/r\"\n".to_string(), "saveset: give passphrase_file or key_file"),
        (
            format!("repository = \"/r\"\npassphrase_file = {pass:?}\nkey_file = {pass:?}\n"),
            "saveset: give passphrase_file or key_file, not both",
        ),
        (
            "repository = \"/r\"\npassphrase_file = \"/nonexistent/pass\"\n".to_string(),
            "saveset.passphrase_file: read passphrase file /nonexistent/pass",
        ),
        (format!("repository = \"/r\"\npassphrase_file = {empty:?}\n"), "is empty"),
    ] {
        let problems = saveset_problems(&section);
        assert!(problems.iter().any(|p| p.contains(expected)), "{expected:?} not in {problems:#?}");
    }
    // Every mistake at once, each naming its field.
    let problems = saveset_problems("repository = \"rel\"\n");
    assert_eq!(problems.len(), 2, "{problems:#?}");

    let err =
        Config::parse(&format!("{FULL}[saveset]\n{good}passphrase = \"inline\"\n")).unwrap_err();
    assert!(err.contains("passphrase"), "{err}");
}

#[test]
fn saveset_unlocks_with_the_right_secret_only_and_never_shows_it() {
    use stillpoint_saveset::{InitOptions, KdfParams, Repository, Secret};

    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    let opts = InitOptions {
        kdf: KdfParams { m_cost_kib: 1024, t_cost: 1, p_cost: 1 },
        ..InitOptions::default()
    };
    Repository::init_with(&repo, &Secret::passphrase("s3cret words"), opts).unwrap();
    let pass = dir.path().join("pass");
    std::fs::write(&pass, "s3cret words\n").unwrap();
    let wrong = dir.path().join("wrong");
    std::fs::write(&wrong, "other words").unwrap();

    let section = |file: &Path| SavesetConfig {
        repository: repo.display().to_string(),
        passphrase_file: Some(file.to_path_buf()),
        key_file: None,
        copy_delay_ms_per_mib: 0,
        base_dir: None,
        sample: stillpoint_saveset::DEFAULT_SAMPLE_PERCENT,
        memory_budget_mib: None,
    };
    assert!(section(&pass).open().is_ok());
    // A memory budget within bounds is used; none at all is refused with the field named.
    assert!(SavesetConfig { memory_budget_mib: Some(16), ..section(&pass) }.open().is_ok());
    let zero = SavesetConfig { memory_budget_mib: Some(0), ..section(&pass) };
    let err = zero.open().map(|_| ()).unwrap_err();
    assert!(err.starts_with("saveset.memory_budget_mib: 0 is not a memory budget in MiB"), "{err}");
    let config = Config::parse(&format!(
        "{FULL}[saveset]\nrepository = {repo:?}\npassphrase_file = {pass:?}\nmemory_budget_mib = 0\n"
    ))
    .unwrap();
    let problems = config.problems();
    assert!(
        problems
            .iter()
            .any(|p| p.starts_with("saveset.memory_budget_mib: 0 is not a memory budget")),
        "{problems:?}"
    );
    let err = section(&wrong).open().map(|_| ()).unwrap_err();
    assert!(err.starts_with("saveset.repository: wrong passphrase or key"), "{err}");
    assert!(!err.contains("other words"), "{err}");
    let missing = SavesetConfig { repository: "/nonexistent/repo".into(), ..section(&pass) };
    let err = missing.open().map(|_| ()).unwrap_err();
    assert!(err.contains("not a saveset repository"), "{err}");
    let config = Config::parse(&format!(
        "{FULL}[saveset]\nrepository = {repo:?}\npassphrase_file = {pass:?}\n"
    ))
    .unwrap();
    assert!(!format!("{config:?}").contains("s3cret"));
}

/// `FULL` with its quiescers replaced by `quiescers` (TOML `[[quiescer]]` tables).
fn with_quiescers(quiescers: &str) -> Config {
    let start = FULL.find("[[quiescer]]").unwrap();
    let end = FULL.find("[snapshot]").unwrap();
    Config::parse(&format!("{}{quiescers}{}", &FULL[..start], &FULL[end..])).unwrap()
}

#[test]
fn mysql_and_redis_quiescers_parse_and_their_mistakes_are_reported_by_field() {
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("pw");
    std::fs::write(&pw, "hunter2\n").unwrap();
    let good = format!(
        "[[quiescer]]\nkind = \"mysql\"\nname = \"db\"\nsocket = \"/run/mysqld/mysqld.sock\"\nuser = \"stillpoint\"\npassword_file = {pw:?}\n\
         [[quiescer]]\nkind = \"redis\"\nname = \"cache\"\nhost = \"127.0.0.1\"\npassword_file = {pw:?}\npause_ms = 20000\n"
    );
    let c = with_quiescers(&good);
    assert_eq!(c.quiescers.iter().map(QuiescerConfig::name).collect::<Vec<_>>(), ["db", "cache"]);
    assert!(matches!(&c.quiescers[0], QuiescerConfig::Mysql(m) if m.timeout_ms == 30_000));
    assert!(
        matches!(&c.quiescers[1], QuiescerConfig::Redis(r) if r.port.is_none() && !r.save_while_paused)
    );
    assert!(c.problems().iter().all(|p| !p.starts_with("quiescer")), "{:?}", c.problems());
    assert!(!format!("{c:?}").contains("hunter2"));

    let start = FULL.find("[[quiescer]]").unwrap();
    let typo = "[[quiescer]]\nkind = \"mysql\"\nname = \"db\"\nsokcet = \"/x\"\n";
    let err = Config::parse(&format!(
        "{}{typo}[snapshot]\nprovider = \"btrfs\"\nsnapshot_dir = \"/x\"\n",
        &FULL[..start]
    ))
    .unwrap_err();
    assert!(err.contains("unknown field `sokcet`"), "{err}");

    let bad = with_quiescers(
        "[[quiescer]]\nkind = \"mysql\"\nname = \"db\"\nhost = \"db\"\nsocket = \"/s\"\npassword_env = \"P\"\noption_file = \"/nonexistent/my.cnf\"\ntimeout_ms = 500\n\
         [[quiescer]]\nkind = \"redis\"\nname = \"cache\"\nsocket = \"redis.sock\"\npause_ms = 90000\n",
    );
    let problems = bad.problems();
    for expected in [
        "quiescer[0]: give the server's socket or its host (not both)",
        "quiescer[0]: give at most one of password_file, password_env and option_file",
        "quiescer[0].timeout_ms: 500 is below 1000",
        "quiescer[0]: password_env: the agent's environment has no variable P",
        "quiescer[1].socket: redis.sock is not an absolute path",
        "quiescer[1].pause_ms: 90000 is not within 1..=60000 (max_lease_ms)",
    ] {
        assert!(problems.iter().any(|p| p.starts_with(expected)), "{expected}\n{problems:#?}");
    }
}

/// A sqlite database on a filesystem an earlier fsfreeze froze is refused (its checkpoint would
/// wait for the thaw); listed before the fsfreeze it is fine.
#[test]
fn a_quiescer_writing_where_an_earlier_fsfreeze_froze_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("app.db");
    std::fs::write(&db, b"").unwrap();
    let fsfreeze =
        format!("[[quiescer]]\nkind = \"fsfreeze\"\nmount = \"{}\"\n", dir.path().display());
    let sqlite = format!(
        "[[quiescer]]\nkind = \"sqlite\"\nname = \"db\"\ndatabases = [\"{}\"]\n",
        db.display()
    );
    let after = with_quiescers(&format!("{fsfreeze}{sqlite}")).problems();
    assert!(
        after.iter().any(|p| p.starts_with("quiescer[1]: ") && p.contains("freezes before it")),
        "{after:#?}"
    );
    let before = with_quiescers(&format!("{sqlite}{fsfreeze}")).problems();
    assert!(!before.iter().any(|p| p.contains("freezes before it")), "{before:#?}");
}
