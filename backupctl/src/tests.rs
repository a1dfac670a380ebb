//! Command-line parsing for every verb, bad input giving a clear clap error (exit 2), and how
//! the global options resolve into the TLS files.

use std::path::PathBuf;

use clap::Parser;

use super::*;
use crate::cmd::start::Wait;

fn parse(args: &[&str]) -> std::result::Result<Cli, clap::Error> {
    Cli::try_parse_from(std::iter::once("backupctl").chain(args.iter().copied()))
}

fn command(args: &[&str]) -> Command {
    parse(args).unwrap_or_else(|e| panic!("{args:?} should parse: {e}")).command
}

/// Bad input is a usage error (exit 2) whose message contains `needle`.
fn check_refused(args: &[&str], needle: &str) {
    let err = parse(args).err().unwrap_or_else(|| panic!("{args:?} should be refused"));
    assert_eq!(err.exit_code(), 2, "{args:?}");
    let text = err.to_string();
    assert!(text.contains(needle), "{args:?}: {text:?} lacks {needle:?}");
}

#[test]
fn start_parses_group_wait_and_json() {
    match command(&["start", "--group", "payroll"]) {
        Command::Start(a) => {
            assert_eq!((a.group.as_str(), a.wait, a.json), ("payroll", Wait::None, false))
        }
        other => panic!("{other:?}"),
    }
    match command(&["start", "--group", "g", "--wait", "snapshotted", "--json"]) {
        Command::Start(a) => assert_eq!((a.wait, a.json), (Wait::Snapshotted, true)),
        other => panic!("{other:?}"),
    }
    match command(&["start", "--group", "g", "--wait", "complete"]) {
        Command::Start(a) => assert_eq!(a.wait, Wait::Complete),
        other => panic!("{other:?}"),
    }
    check_refused(&["start"], "--group");
    check_refused(&["start", "--group", "g", "--wait", "later"], "invalid value 'later'");
}

#[test]
fn status_list_watch_log_parse() {
    assert!(matches!(command(&["status"]), Command::Status(a) if a.id.is_none() && !a.json));
    assert!(
        matches!(command(&["status", "b-1", "--json"]), Command::Status(a) if a.id.as_deref() == Some("b-1") && a.json)
    );
    assert!(matches!(command(&["list"]), Command::List(a) if a.group.is_none() && a.limit == 20));
    assert!(matches!(command(&["list", "--group", "g", "--limit", "0", "--json"]),
        Command::List(a) if a.group.as_deref() == Some("g") && a.limit == 0 && a.json));
    check_refused(&["list", "--limit", "many"], "invalid value 'many'");
    assert!(matches!(command(&["watch"]), Command::Watch(a) if a.id.is_none()));
    assert!(matches!(command(&["watch", "b-1", "--json"]), Command::Watch(a) if a.json));
    assert!(matches!(command(&["log", "b-1"]), Command::Log(a) if a.id == "b-1"));
    check_refused(&["log"], "<ID>");
}

#[test]
fn abort_agents_copied_parse() {
    assert!(matches!(command(&["abort", "b-1", "--reason", "risky"]),
        Command::Abort(a) if a.id == "b-1" && a.reason == "risky"));
    check_refused(&["abort"], "<ID>");
    assert!(matches!(command(&["agents", "--json"]), Command::Agents(a) if a.json));
    assert!(matches!(command(&["copied", "b-1", "--server", "srv-a"]),
        Command::Copied(a) if a.server == "srv-a" && !a.failed && a.detail.is_empty()));
    assert!(
        matches!(command(&["copied", "b-1", "--server", "srv-a", "--failed", "--detail", "tape jam"]),
        Command::Copied(a) if a.failed && a.detail == "tape jam")
    );
    check_refused(&["copied", "b-1"], "--server");
    check_refused(&["frobnicate"], "unrecognized subcommand");
}

#[test]
fn certs_and_san_parse() {
    use crate::cmd::{certs::Certs, san::San};
    assert!(matches!(command(&["certs", "init", "--dir", "d"]),
        Command::Certs(Certs::Init(a)) if a.days == 3650 && a.dir == std::path::Path::new("d")));
    match command(&[
        "certs", "issue", "--dir", "d", "--role", "hook", "--name", "nb", "--host", "a", "--host",
        "10.0.0.1",
    ]) {
        Command::Certs(Certs::Issue(a)) => {
            assert_eq!(
                (a.role, a.name.as_str(), a.days),
                (stillpoint_core::identity::Role::Hook, "nb", 825)
            );
            assert_eq!(a.hosts, ["a", "10.0.0.1"]);
        }
        other => panic!("{other:?}"),
    }
    check_refused(
        &["certs", "issue", "--dir", "d", "--role", "boss", "--name", "x"],
        "expected one of listener, agent, operator, viewer, hook",
    );
    check_refused(&["certs", "init", "--dir", "d", "--days", "0"], "--days");
    assert!(
        matches!(command(&["san", "init", "arr"]), Command::San(San::Init(a)) if a.dir == std::path::Path::new("arr") && a.image.is_none() && a.image_size.is_none())
    );
    assert!(matches!(command(&["san", "init", "arr", "--image", "/x.img", "--image-size", "8G"]),
        Command::San(San::Init(a)) if a.image.as_deref() == Some(std::path::Path::new("/x.img")) && a.image_size == Some(8 << 30)));
    assert!(matches!(command(&["san", "umount", "arr"]), Command::San(San::Umount { .. })));
    assert!(
        matches!(command(&["san", "snapshot", "--array", "a", "--backup", "b", "--server", "s", "--lun", "l", "--json"]),
        Command::San(San::Snapshot(a)) if a.json && a.of.lun == "l")
    );
    assert!(
        matches!(command(&["san", "create-lun", "--array", "a", "--server", "s", "--lun", "l", "--size", "1G"]),
        Command::San(San::CreateLun(a)) if a.size == 1 << 30)
    );
    check_refused(
        &["san", "create-lun", "--array", "a", "--server", "s", "--lun", "l", "--size", "1X"],
        "invalid size \"1X\"",
    );
    assert!(
        matches!(command(&["san", "list", "--array", "a", "--json"]), Command::San(San::List(a)) if a.json)
    );
    assert!(
        matches!(command(&["san", "present", "--array", "a", "--backup", "b", "--server", "s", "--lun", "l"]),
        Command::San(San::Present(a)) if a.backup == "b")
    );
    check_refused(&["san", "present", "--array", "a", "--server", "s", "--lun", "l"], "--backup");
}

#[test]
fn global_options_go_anywhere_and_timeout_is_checked() {
    let cli = parse(&[
        "list",
        "--certs",
        "/c",
        "--identity",
        "alice",
        "--timeout",
        "3",
        "--listener",
        "https://l:1",
    ])
    .unwrap();
    assert_eq!(cli.connection.certs.as_deref(), Some(std::path::Path::new("/c")));
    assert_eq!((cli.connection.identity.as_deref(), cli.connection.timeout), (Some("alice"), 3));
    assert_eq!(cli.connection.listener, "https://l:1");
    check_refused(&["--timeout", "0", "list"], "--timeout");
}

#[test]
fn identity_resolves_from_dir_and_explicit_files_win() {
    let cli = parse(&["--certs", "/c", "--identity", "alice", "--key", "/k/other.key", "agents"])
        .unwrap();
    let files = cli.connection.tls_files().unwrap();
    assert_eq!(files.ca, PathBuf::from("/c/ca.pem"));
    assert_eq!(files.cert, PathBuf::from("/c/alice.pem"));
    assert_eq!(files.key, PathBuf::from("/k/other.key"));
}

#[test]
fn missing_identity_is_a_usage_error_naming_the_flags() {
    let mut cli = parse(&["--certs", "/c", "agents"]).unwrap();
    cli.connection.identity = None; // whatever the test's environment says
    cli.connection.cert = None;
    cli.connection.key = None;
    let err = cli.connection.tls_files().unwrap_err();
    assert_eq!(err.exit_code(), EXIT_USAGE);
    let text = err.to_string();
    for needle in [
        "missing certificate, key",
        "--identity",
        "STILLPOINT_IDENTITY",
        "--cert",
        "STILLPOINT_KEY",
    ] {
        assert!(text.contains(needle), "{text:?} lacks {needle:?}");
    }
}

#[test]
fn saveset_verbs_parse_their_repository_options() {
    match command(&[
        "repo",
        "backup",
        "--repo",
        "/r",
        "--passphrase-file",
        "/p",
        "--backup",
        "b-1",
        "--server",
        "srv-a",
        "--volume",
        "root",
        "/dev/snap",
    ]) {
        Command::Repo(cmd::repo::Repo::Backup(a)) => {
            assert_eq!(a.repo.repo, PathBuf::from("/r"));
            assert_eq!(a.repo.passphrase_file, Some(PathBuf::from("/p")));
            assert_eq!(
                (a.backup.as_str(), a.server.as_str(), a.volume.as_str()),
                ("b-1", "srv-a", "root")
            );
            assert_eq!(a.path, PathBuf::from("/dev/snap"));
        }
        other => panic!("{other:?}"),
    }
    match command(&["verify", "b-1", "--repo", "/r", "--key-file", "/k", "--read-data", "--json"]) {
        Command::Verify(a) => {
            assert_eq!((a.id.as_str(), a.read_data, a.json), ("b-1", true, true));
            assert_eq!(a.repo.key_file, Some(PathBuf::from("/k")));
        }
        other => panic!("{other:?}"),
    }
    match command(&["restore", "b-1", "--repo", "/r", "--server", "s", "--to", "/t", "--force"]) {
        Command::Restore(a) => {
            assert_eq!((a.server.as_str(), a.volume, a.force), ("s", None, true));
            assert_eq!(a.to, PathBuf::from("/t"));
        }
        other => panic!("{other:?}"),
    }
    check_refused(&["restore", "b-1", "--repo", "/r", "--to", "/t"], "--server");
}

#[test]
fn schedules_lists_suspends_and_resumes() {
    use crate::cmd::schedules::Action;
    assert!(
        matches!(command(&["schedules"]), Command::Schedules(a) if a.action.is_none() && !a.json)
    );
    assert!(matches!(command(&["schedules", "--json"]), Command::Schedules(a) if a.json));
    assert!(matches!(command(&["schedules", "suspend", "nightly"]),
        Command::Schedules(a) if matches!(&a.action, Some(Action::Suspend(n)) if n.name == "nightly")));
    assert!(matches!(command(&["schedules", "resume", "nightly", "--json"]),
        Command::Schedules(a) if matches!(&a.action, Some(Action::Resume(n)) if n.name == "nightly" && n.json)));
    check_refused(&["schedules", "suspend"], "<NAME>");
}
