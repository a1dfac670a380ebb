//! The exec quiescer against real /bin/sh commands.

use std::time::{Duration, Instant};

use super::Exec;
use crate::quiesce::Quiescer;

fn sh(script: &str) -> Option<Vec<String>> {
    Some(vec!["/bin/sh".into(), "-c".into(), script.into()])
}

fn check(pre: Option<Vec<String>>, post: Option<Vec<String>>, timeout_ms: u64) -> Exec {
    Exec::new("app".into(), "srv-a", pre, post, Duration::from_millis(timeout_ms))
}

#[test]
fn commands_see_backup_server_and_phase() {
    let q = check(
        sh("echo \"$STILLPOINT_BACKUP_ID $STILLPOINT_SERVER $STILLPOINT_PHASE\""),
        None,
        5000,
    );
    let detail = q.freeze("b1").unwrap();
    assert!(detail.ends_with("b1 srv-a pre-freeze"), "{detail}");
}

#[test]
fn a_failing_command_reports_its_status_and_the_tail_of_stderr() {
    let q =
        check(sh("head -c 2000 /dev/zero | tr '\\0' a >&2; echo the-end >&2; exit 7"), None, 5000);
    let err = format!("{:#}", q.freeze("b1").unwrap_err());
    assert!(err.contains("exit status: 7") && err.ends_with("the-end"), "{err}");
    assert!(err.len() < 600, "stderr not cut to its tail: {} bytes", err.len());
}

#[test]
fn a_command_past_its_timeout_is_killed() {
    let q = check(sh("exec sleep 30"), None, 200);
    let started = Instant::now();
    let err = format!("{:#}", q.freeze("b1").unwrap_err());
    assert!(err.contains("timed out after 200ms and was killed"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
}

#[test]
fn thaw_runs_post_thaw_once_and_is_safe_to_repeat() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let post = sh(&format!("echo $STILLPOINT_PHASE >> {}", log.display()));
    let q = check(None, post, 5000);
    q.thaw("b1").unwrap();
    assert!(!log.exists(), "thaw without a freeze ran post_thaw");
    q.freeze("b1").unwrap();
    q.thaw("b1").unwrap();
    q.thaw("b1").unwrap();
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "post-thaw\n");
}

#[test]
fn a_missing_program_is_an_error_naming_it() {
    let q = check(Some(vec!["/nonexistent/flush".into()]), None, 5000);
    let err = format!("{:#}", q.freeze("b1").unwrap_err());
    assert!(err.contains("/nonexistent/flush"), "{err}");
}

#[test]
fn files_left_in_the_artifacts_dir_are_handed_over_once_after_the_thaw() {
    let dir = tempfile::tempdir().unwrap();
    let pre = sh("echo stale > \"$STILLPOINT_ARTIFACTS_DIR/from-freeze\"");
    let post = sh("printf 'pos 42' > \"$STILLPOINT_ARTIFACTS_DIR/position\"; mkdir \"$STILLPOINT_ARTIFACTS_DIR/sub\"");
    let q = check(pre, post, 5000).with_artifacts_dir(Some(dir.path().to_path_buf()));
    std::fs::create_dir_all(dir.path().join("b1")).unwrap();
    std::fs::write(dir.path().join("b1/left-from-before"), "old").unwrap();
    q.freeze("b1").unwrap();
    assert!(!dir.path().join("b1/left-from-before").exists(), "cleared before the freeze");
    q.thaw("b1").unwrap();
    let got = q.artifacts("b1");
    let names: Vec<(&str, &[u8])> = got.iter().map(|a| (a.name.as_str(), &a.bytes[..])).collect();
    assert_eq!(names, [("from-freeze", &b"stale\n"[..]), ("position", &b"pos 42"[..])]);
    assert!(got.iter().all(|a| a.quiescer == "app"));
    assert!(!dir.path().join("b1").exists(), "the directory goes with them");
    assert!(q.artifacts("b1").is_empty(), "handed over once");
}

#[test]
fn without_an_artifacts_dir_commands_see_none_and_nothing_is_handed_over() {
    let q = check(sh("echo \"[${STILLPOINT_ARTIFACTS_DIR-unset}]\""), None, 5000);
    assert!(q.freeze("b1").unwrap().ends_with("[unset]"));
    q.thaw("b1").unwrap();
    assert!(q.artifacts("b1").is_empty());
}

#[test]
fn a_file_over_the_limit_is_read_only_far_enough_to_show_it() {
    let dir = tempfile::tempdir().unwrap();
    let post = sh("head -c 1000000 /dev/zero > \"$STILLPOINT_ARTIFACTS_DIR/huge\"");
    let q = check(None, post, 5000).with_artifacts_dir(Some(dir.path().to_path_buf()));
    q.freeze("b1").unwrap();
    q.thaw("b1").unwrap();
    let got = q.artifacts("b1");
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].bytes.len(), stillpoint_protocol::model::MAX_ARTIFACT_BYTES + 1);
}
