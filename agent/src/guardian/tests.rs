//! The guardian's bookkeeping with time as an input: deadlines start at first hearing, actions
//! run in reverse order, release hands them back exactly once.

use super::*;

fn fithaw(mount: &str) -> Action {
    Action::Fithaw { mount: mount.into() }
}

fn arm(backup: &str, lease_ms: u64, key: &str) -> Request {
    Request::Arm { backup: backup.into(), lease_ms, key: key.into(), action: fithaw(key) }
}

fn check(requests: &[(u64, Request)]) -> (Ledger, Vec<Outcome>) {
    let mut ledger = Ledger::default();
    let outcomes = requests.iter().map(|(at, r)| ledger.handle(*at, r.clone())).collect();
    (ledger, outcomes)
}

fn keys(held: &Held) -> Vec<&str> {
    held.actions.iter().map(|(k, _)| k.as_str()).collect()
}

#[test]
fn the_lease_counts_from_the_first_arm_and_actions_run_in_reverse() {
    let (mut ledger, outcomes) = check(&[
        (100, arm("b1", 1000, "/a")),
        (400, arm("b1", 1000, "/b")),
        (450, arm("b1", 5, "/c")),
    ]);
    assert_eq!(outcomes, [Outcome::Armed; 3]);
    assert_eq!(ledger.next_deadline(), Some(1100));
    assert!(ledger.due(1099).is_empty());
    let due = ledger.due(1100);
    assert_eq!(due.len(), 1);
    assert_eq!(keys(&due[0]), ["/c", "/b", "/a"]);
    assert_eq!(ledger.next_deadline(), None);
    // Late requests learn it was thawed; nothing runs twice.
    assert_eq!(
        ledger.handle(1200, Request::Release { backup: "b1".into() }),
        Outcome::AlreadyThawed
    );
    assert_eq!(ledger.handle(1200, arm("b1", 1000, "/d")), Outcome::AlreadyThawed);
    assert!(ledger.due(10_000).is_empty());
}

#[test]
fn release_hands_the_actions_back_and_nothing_fires_later() {
    let (mut ledger, outcomes) =
        check(&[(0, arm("b1", 1000, "/a")), (10, Request::Release { backup: "b1".into() })]);
    assert_eq!(outcomes, [Outcome::Armed, Outcome::Released]);
    assert!(ledger.due(5000).is_empty());
    assert!(ledger.drain().is_empty());
    assert_eq!(ledger.handle(20, Request::Release { backup: "b1".into() }), Outcome::Unknown);
}

#[test]
fn disarm_drops_one_action_that_must_never_run() {
    let (mut ledger, outcomes) = check(&[
        (0, arm("b1", 1000, "/a")),
        (1, arm("b1", 1000, "/busy")),
        (2, Request::Disarm { backup: "b1".into(), key: "/busy".into() }),
        (3, Request::Disarm { backup: "b1".into(), key: "/never".into() }),
    ]);
    assert_eq!(outcomes, [Outcome::Armed, Outcome::Armed, Outcome::Disarmed, Outcome::Unknown]);
    assert_eq!(keys(&ledger.due(1000)[0]), ["/a"]);
}

#[test]
fn eof_drains_everything_newest_backup_first() {
    let (mut ledger, _) = check(&[
        (0, arm("b1", 60_000, "/a")),
        (0, arm("b1", 60_000, "/b")),
        (5, arm("b2", 1000, "/c")),
    ]);
    let all = ledger.drain();
    let order: Vec<_> = all.iter().map(|h| (h.backup.as_str(), keys(h))).collect();
    assert_eq!(order, [("b2", vec!["/c"]), ("b1", vec!["/b", "/a"])]);
    assert_eq!(ledger.next_deadline(), None);
}

#[test]
fn requests_and_replies_are_one_json_line_each() {
    let env = Envelope { seq: 7, request: arm("b1", 1000, "/a") };
    let line = serde_json::to_string(&env).unwrap();
    assert_eq!(
        line,
        r#"{"seq":7,"op":"arm","backup":"b1","lease_ms":1000,"key":"/a","action":{"kind":"fithaw","mount":"/a"}}"#
    );
    let back: Envelope = serde_json::from_str(&line).unwrap();
    assert_eq!(back.request, env.request);
    let run = Action::Run { argv: vec!["true".into()], env: vec![], timeout_ms: 5 };
    assert_eq!(run.done("app"), "ran post_thaw of quiescer app");
}

#[test]
fn serve_answers_in_order_and_runs_what_it_holds_at_eof() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("ran");
    let action = Action::Run {
        argv: vec!["/bin/sh".into(), "-c".into(), format!("echo x >> {}", marker.display())],
        env: vec![],
        timeout_ms: 5000,
    };
    let requests = [
        Envelope {
            seq: 1,
            request: Request::Arm {
                backup: "b1".into(),
                lease_ms: 60_000,
                key: "app".into(),
                action,
            },
        },
        Envelope { seq: 2, request: Request::Release { backup: "nope".into() } },
    ];
    let input: String =
        requests.iter().map(|r| serde_json::to_string(r).unwrap() + "\n").collect::<String>()
            + "garbage\n";
    let mut output = Vec::new();
    serve(std::io::Cursor::new(input.into_bytes()), &mut output, None);
    let replies: Vec<Reply> = String::from_utf8(output)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(replies[0].outcome, Some(Outcome::Armed));
    assert_eq!((replies[1].seq, replies[1].outcome), (2, Some(Outcome::Unknown)));
    assert!(replies[2].error.as_deref().unwrap_or("").contains("unreadable"), "{:?}", replies[2]);
    assert_eq!(std::fs::read_to_string(&marker).unwrap(), "x\n");
}

/// The hold of a database quiescer lives as long as its connection: the guardian's Hangup ends
/// that connection (the server reads EOF) even though another process owns the socket.
#[test]
fn hangup_closes_the_connection_so_the_server_lets_go() {
    use std::io::Read;
    use std::os::fd::AsFd;
    let server = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let client = std::net::TcpStream::connect(server.local_addr().expect("addr")).expect("connect");
    let (mut accepted, _) = server.accept().expect("accept");
    let action = Action::hangup_own(client.as_fd()).expect("a socket");
    let detail = action.execute().expect("hang up");
    assert!(detail.starts_with("closed connection"), "{detail}");
    let mut buf = [0u8; 8];
    assert_eq!(accepted.read(&mut buf).expect("read"), 0, "the server sees the connection closed");
    // Twice is harmless: the socket is still open here but no longer connected.
    let again = action.execute().expect("hang up again");
    assert!(again.contains("already closed") || again.starts_with("closed"), "{again}");
}

/// An fd number reused for another socket after the quiescer let go is never shut down.
#[test]
fn hangup_never_hits_a_reused_descriptor() {
    use std::io::{Read, Write};
    use std::os::fd::AsFd;
    let server = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = server.local_addr().expect("addr");
    let first = std::net::TcpStream::connect(addr).expect("connect");
    let action = Action::hangup_own(first.as_fd()).expect("a socket");
    drop(first);
    let _ = server.accept().expect("accept the first");
    // The lowest free fd: very likely the number the first socket had.
    let mut second = std::net::TcpStream::connect(addr).expect("connect again");
    let (mut accepted, _) = server.accept().expect("accept the second");
    let detail = action.execute().expect("hang up");
    assert!(detail.contains("already closed"), "{detail}");
    second.write_all(b"still").expect("the second connection still works");
    let mut buf = [0u8; 5];
    accepted.read_exact(&mut buf).expect("read");
    assert_eq!(&buf, b"still");
}

/// A process that is gone took its connections with it.
#[test]
fn hangup_of_a_process_that_is_gone_is_done() {
    let detail = Action::Hangup { pid: i32::MAX - 1, fd: 3, inode: 1 }.execute().expect("done");
    assert!(detail.contains("already closed"), "{detail}");
}

/// The log says what an undo did: "killed" or "resumed" only when the signal went out, and
/// what was found instead when the process was already gone.
#[test]
fn undo_claims_only_what_it_did() {
    let mut child = std::process::Command::new("sleep").arg("60").spawn().expect("spawn sleep");
    let pid = i32::try_from(child.id()).unwrap();
    let me = ProcRef::of(pid).expect("the child runs");
    let kill = Action::Kill { pid, start: me.start };
    assert_eq!(kill.undo("db").unwrap(), kill.done("db"));
    child.wait().expect("reap");
    assert_eq!(kill.undo("db").unwrap(), format!("quiescer db: holder process {pid} is gone"));
    let resume = Action::ResumeAll { procs: vec![me] };
    assert_eq!(
        resume.undo("app").unwrap(),
        "quiescer app: resumed processes [] (1 gone)",
        "never \"{}\"",
        resume.done("app")
    );
    let both = Action::Each { actions: vec![kill, Action::Resume { pid: i32::MAX - 1 }] };
    assert_eq!(
        both.undo("x").unwrap(),
        format!(
            "quiescer x: holder process {pid} is gone; quiescer x: process {} is gone",
            i32::MAX - 1
        )
    );
}
