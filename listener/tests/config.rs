//! The listener's config: every example in `deploy/` parses and is valid but for its TLS paths
//! (which name a real deployment's files), and mistakes are all reported at once, by field.

use std::path::Path;

use stillpoint_listener::Config;

fn parse(text: &str) -> Config {
    toml::from_str(text).unwrap_or_else(|e| panic!("parse: {e}"))
}

#[test]
fn every_listener_example_in_deploy_is_valid() {
    let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    let mut seen = 0;
    for entry in std::fs::read_dir(&deploy).expect("deploy dir") {
        let path = entry.expect("entry").path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
        if !(name.starts_with("listener") && name.ends_with(".toml")) {
            continue;
        }
        let config = parse(&std::fs::read_to_string(&path).expect("read example"));
        let problems: Vec<_> =
            config.problems().into_iter().filter(|p| !p.starts_with("tls.")).collect();
        assert!(problems.is_empty(), "{name}: {problems:?}");
        seen += 1;
    }
    assert!(seen > 0, "no listener example found in {}", deploy.display());
}

#[test]
fn mistakes_are_reported_together_naming_each_field() {
    let config = parse(
        r#"
data_dir = "/tmp/x"
listen = "127.0.0.1:0"
[tls]
ca = "/nonexistent/ca.pem"
cert = "/nonexistent/l.pem"
key = "/nonexistent/l.key"
[timeouts]
lease_ms = 3000
agent_copy_silence_ms = 5000
[[server]]
name = "a"
address = "127.0.0.1:1"
[[server]]
name = "a"
address = "nowhere"
[[group]]
name = "g"
servers = ["a", "zz"]
require_hold = "crash"
thaw = "later"
[copy]
mode = "command"
command = []
"#,
    );
    let problems = config.problems().join("\n");
    for expected in [
        "tls.ca: /nonexistent/ca.pem does not exist",
        "server.name: \"a\" is listed twice",
        "address \"nowhere\" must be host:port",
        "group g: server \"zz\" is not in the inventory",
        "leaves -1000ms to gather prepares",
        "copy.command: empty",
        "timeouts.agent_copy_silence_ms: 5000 is below 10000",
        "group g: require_hold: unknown hold class \"crash\"; one of: storage-only, hook-unverified, stopped-processes, filesystem-freeze, application",
        "group g: thaw: unknown value \"later\"; one of: after-own-snapshot, after-every-snapshot",
    ] {
        assert!(problems.contains(expected), "missing {expected:?} in:\n{problems}");
    }
}

#[test]
fn unknown_fields_are_refused() {
    let err = toml::from_str::<Config>("data_dir = \"/x\"\nlisten = \"127.0.0.1:1\"\nlisen = 1\n")
        .unwrap_err();
    assert!(err.to_string().contains("lisen"), "{err}");
}

const SAVESET_BASE: &str = r#"
data_dir = "/tmp/x"
listen = "127.0.0.1:0"
[tls]
ca = "/x"
cert = "/x"
key = "/x"
[[server]]
name = "a"
address = "127.0.0.1:1"
[[group]]
name = "g"
servers = ["a"]
"#;

fn copy_problems(copy: &str) -> String {
    let config = parse(&format!("{SAVESET_BASE}[copy]\n{copy}"));
    config.problems().into_iter().filter(|p| !p.starts_with("tls.")).collect::<Vec<_>>().join("\n")
}

#[test]
fn saveset_mode_unlocks_its_repository_at_load_and_defaults_to_an_index_verify() {
    use stillpoint_listener::config::{CopyConfig, VerifyMode};
    use stillpoint_saveset::{InitOptions, KdfParams, Repository, Secret};

    let dir = tempfile::tempdir().expect("temp dir");
    let repo = dir.path().join("repo");
    let opts = InitOptions {
        kdf: KdfParams { m_cost_kib: 1024, t_cost: 1, p_cost: 1 },
        ..InitOptions::default()
    };
    Repository::init_with(&repo, &Secret::passphrase("s3cret words"), opts).expect("init");
    let pass = dir.path().join("pass");
    std::fs::write(&pass, "s3cret words\n").expect("write passphrase");
    let wrong = dir.path().join("wrong");
    std::fs::write(&wrong, "other words").expect("write passphrase");

    let good = format!("mode = \"saveset\"\nrepository = {repo:?}\npassphrase_file = {pass:?}\n");
    assert_eq!(copy_problems(&good), "");
    let config = parse(&format!("{SAVESET_BASE}[copy]\n{good}"));
    let CopyConfig::Saveset(saveset) = &config.copy else { panic!("not saveset: {config:?}") };
    assert_eq!(saveset.verify, VerifyMode::Index);
    // The secret is never in the config's Debug (only the file's path is).
    assert!(!format!("{config:?}").contains("s3cret"));

    let problems = copy_problems(&format!(
        "mode = \"saveset\"\nrepository = {repo:?}\npassphrase_file = {wrong:?}\nverify = \"read-data\"\n"
    ));
    assert!(
        problems.contains("copy.repository: wrong passphrase or key for repository"),
        "{problems}"
    );
    assert!(!problems.contains("other words"), "{problems}");

    let problems = copy_problems(
        "mode = \"saveset\"\nrepository = \"/nonexistent/repo\"\npassphrase_file = \"/nonexistent/pass\"\n",
    );
    assert!(
        problems.contains("copy.passphrase_file: read passphrase file /nonexistent/pass"),
        "{problems}"
    );

    let problems = copy_problems(&format!(
        "mode = \"saveset\"\nrepository = \"/nonexistent/repo\"\npassphrase_file = {pass:?}\n"
    ));
    assert!(
        problems.contains("copy.repository: open /nonexistent/repo: not a saveset repository"),
        "{problems}"
    );

    let problems = copy_problems(&format!("mode = \"saveset\"\nrepository = {repo:?}\n"));
    assert!(problems.contains("needs passphrase_file or key_file"), "{problems}");

    for bad in ["verify = \"sometimes\"", "passphrase = \"inline\""] {
        let text =
            format!("{SAVESET_BASE}[copy]\nmode = \"saveset\"\nrepository = {repo:?}\n{bad}\n");
        assert!(toml::from_str::<stillpoint_listener::Config>(&text).is_err(), "{bad} accepted");
    }
}

#[test]
fn the_commented_saveset_example_parses() {
    use stillpoint_listener::config::{CopyConfig, VerifyMode};

    #[derive(serde::Deserialize)]
    struct Copy {
        copy: CopyConfig,
    }
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/listener.example.toml");
    let text = std::fs::read_to_string(path).expect("read example");
    let lines: Vec<&str> = text.lines().collect();
    let at = lines.iter().position(|l| *l == "# mode = \"saveset\"").expect("saveset example");
    let block: String = lines[at - 1..]
        .iter()
        .take_while(|l| l.starts_with("# "))
        .map(|l| format!("{}\n", &l[2..]))
        .collect();
    let parsed: Copy = toml::from_str(&block).unwrap_or_else(|e| panic!("{e}:\n{block}"));
    let CopyConfig::Saveset(saveset) = parsed.copy else { panic!("not saveset:\n{block}") };
    assert_eq!(saveset.verify, VerifyMode::Index);
    assert!(saveset.passphrase_file.is_some() && saveset.key_file.is_none());
}

#[test]
fn saveset_copies_on_the_listener_unless_told_to_copy_on_the_agents() {
    use stillpoint_listener::config::{CopyConfig, CopyOn};

    let on = |line: &str| {
        let text = format!(
            "{SAVESET_BASE}[copy]\nmode = \"saveset\"\n{line}repository = \"/r\"\npassphrase_file = \"/p\"\n"
        );
        toml::from_str::<Config>(&text).map(|c| match c.copy {
            CopyConfig::Saveset(s) => s.on,
            other => panic!("not saveset: {other:?}"),
        })
    };
    // Existing configs keep copying on the listener.
    assert_eq!(on("").unwrap(), CopyOn::Listener);
    assert_eq!(on("on = \"listener\"\n").unwrap(), CopyOn::Listener);
    assert_eq!(on("on = \"agent\"\n").unwrap(), CopyOn::Agent);
    let err = on("on = \"backup-server\"\n").unwrap_err().to_string();
    assert!(err.contains("backup-server") && err.contains("agent"), "{err}");
    // `on` belongs to saveset mode only.
    let text = format!(
        "{SAVESET_BASE}[copy]\nmode = \"command\"\ncommand = [\"/bin/true\"]\non = \"agent\"\n"
    );
    assert!(toml::from_str::<Config>(&text).is_err());
}

#[test]
fn a_group_states_the_hold_it_requires_and_its_thaw() {
    let text = |group: &str| {
        format!(
            "data_dir = \"/tmp/x\"\nlisten = \"127.0.0.1:0\"\n[tls]\nca = \"c\"\ncert = \"c\"\nkey = \"k\"\n[[server]]\nname = \"a\"\naddress = \"127.0.0.1:1\"\n[[group]]\nname = \"g\"\nservers = [\"a\"]\n{group}[copy]\nmode = \"report\"\n"
        )
    };
    let plain = parse(&text(""));
    let g = plain.group("g").expect("group");
    assert_eq!(g.require_hold(), stillpoint_protocol::hold::Hold::StorageOnly, "no requirement");
    assert!(!g.thaw_barrier(), "thaw after its own snapshot, as before");
    let strict =
        parse(&text("require_hold = \"filesystem-freeze\"\nthaw = \"after-every-snapshot\"\n"));
    let g = strict.group("g").expect("group");
    assert_eq!(g.require_hold(), stillpoint_protocol::hold::Hold::FilesystemFreeze);
    assert!(g.thaw_barrier());
    assert!(!strict.problems().iter().any(|p| p.starts_with("group")), "{:?}", strict.problems());
}

#[test]
fn the_commented_notify_example_parses_and_a_watch_needs_somewhere_to_alert() {
    #[derive(serde::Deserialize)]
    struct Notify {
        notify: stillpoint_notify::NotifyConfig,
    }
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/listener.example.toml");
    let text = std::fs::read_to_string(path).expect("read example");
    let lines: Vec<&str> = text.lines().collect();
    let at = lines.iter().position(|l| *l == "# [notify]").expect("notify example");
    let block: String = lines[at..]
        .iter()
        .take_while(|l| l.starts_with("# "))
        .map(|l| format!("{}\n", &l[2..]))
        .collect();
    let parsed: Notify = toml::from_str(&block).unwrap_or_else(|e| panic!("{e}:\n{block}"));
    assert_eq!(parsed.notify.email[0].to.len(), 2);
    assert_eq!(parsed.notify.webhook.len(), 1);

    let group = |extra: &str| {
        format!(
            "data_dir = \"/x\"\nlisten = \"127.0.0.1:1\"\n[tls]\nca = \"/c\"\ncert = \"/c\"\nkey = \"/k\"\n[[server]]\nname = \"a\"\naddress = \"a:1\"\n[[group]]\nname = \"g\"\nservers = [\"a\"]\n{extra}\n[copy]\nmode = \"report\"\n"
        )
    };
    let watched = parse(&group("no_good_backup_after = \"26h\""));
    let after = watched.group("g").expect("group").no_good_backup_after.expect("set");
    assert_eq!(after.0, std::time::Duration::from_secs(26 * 3600));
    let problems = watched.problems().join("\n");
    assert!(
        problems.contains("group g: no_good_backup_after needs [notify] with an [[notify.email]] or [[notify.webhook]]"),
        "{problems}"
    );
    let err = toml::from_str::<Config>(&group("no_good_backup_after = \"a day\"")).unwrap_err();
    assert!(err.to_string().contains("\"a day\""), "{err}");
}

#[test]
fn schedules_are_checked_by_name_group_cron_and_time_zone() {
    let base = "data_dir = \"/tmp/x\"\nlisten = \"127.0.0.1:0\"\n";
    let rest = "[tls]\nca = \"c\"\ncert = \"c\"\nkey = \"k\"\n[[server]]\nname = \"a\"\naddress = \"127.0.0.1:1\"\n[[group]]\nname = \"g\"\nservers = [\"a\"]\n[copy]\nmode = \"report\"\n";
    let schedule = |name: &str, group: &str, cron: &str| {
        format!("[[schedule]]\nname = \"{name}\"\ngroup = \"{group}\"\ncron = \"{cron}\"\n")
    };
    let good = parse(&format!(
        "{base}timezone = \"Europe/Berlin\"\n{rest}{}{}enabled = false\n",
        schedule("nightly", "g", "0 22 * * mon-fri"),
        schedule("every-4h", "g", "0 */4 * * *"),
    ));
    let schedule_problems = |c: &Config| {
        c.problems().into_iter().filter(|p| !p.starts_with("tls.")).collect::<Vec<_>>()
    };
    assert_eq!(schedule_problems(&good), Vec::<String>::new());
    let parsed = good.schedules();
    assert_eq!(parsed.len(), 2);
    assert!(parsed[0].enabled && !parsed[1].enabled, "enabled = false starts suspended");

    let bad = parse(&format!(
        "{base}timezone = \"Mars/Olympus\"\n{rest}{}{}{}",
        schedule("nightly", "g", "0 25 * * *"),
        schedule("nightly", "nope", "@daily"),
        schedule("bad name", "g", "@daily"),
    ));
    let problems = schedule_problems(&bad).join("\n");
    for says in [
        "timezone: \"Mars/Olympus\": failed to find time zone",
        "use an IANA name such as \"Europe/Berlin\"",
        "schedule nightly: cron: hour field \"25\": 25 is outside 0-23",
        "schedule.name: \"nightly\" is listed twice",
        "schedule nightly: group \"nope\" is not configured ([[group]])",
        "schedule.name: ",
    ] {
        assert!(problems.contains(says), "{problems}\nlacks {says:?}");
    }
    // No timezone: the system's zone, no problem.
    let local = parse(&format!("{base}{rest}{}", schedule("nightly", "g", "@daily")));
    assert!(local.time_zone().is_ok());
    // Unknown keys in a schedule are refused.
    let text = format!("{base}{rest}{}color = \"red\"\n", schedule("n", "g", "@daily"));
    assert!(toml::from_str::<Config>(&text).is_err());
}
