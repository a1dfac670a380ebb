//! The process quiescer's config checks and its refusal to stop what was never armed; its
//! real runs against programs are in agent/tests/it/process.rs.

use super::*;

fn config() -> ProcessConfig {
    ProcessConfig {
        name: "avimark".into(),
        comm: Some("avimark".into()),
        exe: None,
        pidfile: None,
        notify: None,
        stop_signal: None,
        stop_command: None,
        grace_ms: 0,
        lockout_executable: None,
        lock_command: None,
        unlock_command: None,
        timeout_ms: 1000,
    }
}

fn problems(c: &ProcessConfig) -> Vec<String> {
    let mut out = Vec::new();
    c.problems("quiescer[1]", 60_000, &mut out);
    out
}

#[test]
fn polite_signals_parse_by_either_name() {
    assert_eq!(parse_signal("TERM"), Some(Signal::Term));
    assert_eq!(parse_signal("sigusr1"), Some(Signal::Usr1));
    assert_eq!(parse_signal(" HUP "), Some(Signal::Hup));
    // SIGSTOP and SIGKILL are not polite stops: the quiescer stops on its own terms.
    assert_eq!(parse_signal("KILL"), None);
    assert_eq!(parse_signal("STOP"), None);
}

#[test]
fn config_problems_name_each_field() {
    assert_eq!(problems(&config()), Vec::<String>::new());
    let mut c = config();
    c.comm = None;
    assert_eq!(problems(&c), vec!["quiescer[1]: say which processes: comm, exe or pidfile"]);

    let mut c = config();
    c.comm = Some("a-name-longer-than-15".into());
    c.exe = Some("bin/app".into());
    c.lockout_executable = Some("/nonexistent/app".into());
    c.stop_signal = Some("STOP".into());
    c.stop_command = Some(vec![]);
    c.lock_command = Some(vec!["true".into()]);
    c.grace_ms = 60_000;
    c.timeout_ms = 0;
    let found = problems(&c);
    let expect = [
        "quiescer[1].comm: \"a-name-longer-than-15\" is not a process name",
        "quiescer[1].exe: bin/app is not an absolute path",
        "quiescer[1].lockout_executable: /nonexistent/app is not an existing file",
        "quiescer[1].stop_signal: \"STOP\" is not one of TERM",
        "quiescer[1]: give stop_signal or stop_command, not both",
        "quiescer[1]: lock_command and unlock_command go together",
        "quiescer[1].stop_command: give the program and its arguments",
        "quiescer[1].timeout_ms: must be above 0",
        "quiescer[1].grace_ms: 60000 leaves no time of the longest lease (60000ms)",
    ];
    assert_eq!(found.len(), expect.len(), "{found:#?}");
    for (f, e) in found.iter().zip(expect) {
        assert!(f.starts_with(e), "{f:?} should start with {e:?}");
    }
}

#[test]
fn freeze_without_an_armed_guardian_action_stops_nothing() {
    let p = Process::new(config(), "srv");
    let e = p.freeze("b1").unwrap_err().to_string();
    assert!(e.contains("nothing was armed with the guardian for backup b1"), "{e}");
    p.thaw("b1").unwrap();
}

#[test]
fn the_deploy_example_parses_into_this_config() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/agent-sqlite-process.example.toml");
    let config = crate::Config::load(&path).unwrap();
    let found = config.quiescers.iter().find_map(|q| match q {
        crate::config::QuiescerConfig::Process(c) => Some(c.clone()),
        _ => None,
    });
    let c = found.expect("a process quiescer in the example");
    assert_eq!(c.comm.as_deref(), Some("avimark"));
    assert_eq!(c.lockout_executable, Some("/opt/avimark/bin/avimark".into()));
    assert_eq!(c.notify.as_ref().map(|n| n[0].as_str()), Some("/usr/bin/wall"));
    let mut out = Vec::new();
    c.problems("quiescer[1]", config.max_lease_ms, &mut out);
    // Only the executable, which this machine lacks, is a problem.
    assert_eq!(
        out,
        vec!["quiescer[1].lockout_executable: /opt/avimark/bin/avimark is not an existing file"]
    );
}

/// A failed freeze says it undid a lock-out only when there was one to undo.
#[test]
fn a_failed_freeze_without_a_lockout_claims_none_undone() {
    let c = ProcessConfig {
        comm: Some("no-such-app-9z".into()),
        stop_command: Some(vec!["/bin/false".into()]),
        ..config()
    };
    let q = Process::new(c, "srv");
    q.thaw_action("b1").expect("armed");
    let e = format!("{:#}", q.freeze("b1").expect_err("stop_command fails"));
    assert!(e.ends_with("; resumed what it had stopped"), "{e}");
    q.thaw("b1").expect("nothing to thaw");
}

/// A freeze for another backup leaves what was armed for this one in place.
#[test]
fn a_freeze_for_another_backup_keeps_this_ones_arm() {
    let q = Process::new(ProcessConfig { comm: Some("no-such-app-9z".into()), ..config() }, "srv");
    q.thaw_action("b1").expect("armed");
    let e = format!("{:#}", q.freeze("b2").expect_err("b2 was never armed"));
    assert!(e.contains("nothing was armed with the guardian for backup b2"), "{e}");
    let detail = q.freeze("b1").expect("b1 is still armed");
    assert!(detail.contains("no process matching"), "{detail}");
    q.thaw("b1").expect("thaw");
}
