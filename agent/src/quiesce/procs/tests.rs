//! Process identity against real children: /proc parsing, pidfd signals that skip another
//! start time, and finding processes by comm, executable and pidfile.

use std::process::{Child, Command};
use std::time::{Duration, Instant};

use super::*;

/// A `sleep` child, killed and reaped on Drop.
struct Sleep(Child);

impl Sleep {
    fn start() -> Sleep {
        Sleep(Command::new("sleep").arg("1000").spawn().unwrap())
    }
    fn pid(&self) -> i32 {
        self.0.id() as i32
    }
}

impl Drop for Sleep {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_until(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn stat_lines_with_odd_names_parse() {
    let line = "4242 (a) b (c)) T 1 4242 4242 0 -1 4194560 97 0 0 0 1 2 0 0 20 0 3 0 987654 1 2";
    let s = parse_stat(line).unwrap();
    assert_eq!(s.comm, "a) b (c)");
    assert_eq!(s.state, 'T');
    assert_eq!(s.start, 987654);
    assert!(!s.kernel_thread);
    let kthread = "2 (kthreadd) S 0 0 0 0 -1 2129984 0 0 0 0 0 0 0 0 20 0 1 0 5 0 0";
    assert!(parse_stat(kthread).unwrap().kernel_thread);
    assert_eq!(parse_stat("garbage"), None);
}

#[test]
fn a_process_is_stopped_resumed_and_killed_only_while_it_is_the_same_one() {
    let sleep = Sleep::start();
    let p = ProcRef::of(sleep.pid()).unwrap();
    assert!(p.alive());
    // Another start time under the same pid is another process: never signalled.
    let other = ProcRef { pid: p.pid, start: p.start + 1 };
    assert!(!other.alive());
    assert!(!other.signal(Signal::Stop).unwrap());
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(p.stopped(), Some(false));

    assert!(p.signal(Signal::Stop).unwrap());
    wait_until("state T", || p.stopped() == Some(true));
    assert_eq!(resume_all(&[p, other]).unwrap(), format!("resumed processes [{}] (1 gone)", p.pid));
    wait_until("resumed", || p.stopped() == Some(false));

    assert_eq!(kill(&p).unwrap(), format!("killed holder process {}", p.pid));
    wait_until("exit", || !p.alive());
    assert_eq!(kill(&p).unwrap(), format!("holder process {} is gone", p.pid));
    assert_eq!(p.stopped(), None);
}

#[test]
fn processes_are_found_by_comm_exe_or_pidfile_never_this_one() {
    let sleep = Sleep::start();
    let p = ProcRef::of(sleep.pid()).unwrap();
    let by_comm = Matcher { comm: Some("sleep".into()), ..Matcher::default() }.find().unwrap();
    assert!(by_comm.iter().any(|(q, c)| *q == p && c == "sleep"), "{by_comm:?}");
    let exe = exe(sleep.pid()).unwrap();
    let by_exe = Matcher { exe: Some(exe.clone()), ..Matcher::default() }.find().unwrap();
    assert!(by_exe.iter().any(|(q, _)| *q == p), "{by_exe:?}");

    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("app.pid");
    std::fs::write(&pidfile, format!("{}\n", sleep.pid())).unwrap();
    let m = Matcher { pidfile: Some(pidfile.clone()), ..Matcher::default() };
    assert_eq!(m.find().unwrap(), vec![(p, "sleep".to_string())]);
    std::fs::write(&pidfile, "nope\n").unwrap();
    let e = m.find().unwrap_err().to_string();
    assert!(e.contains("app.pid") && e.contains("not a pid"), "{e}");

    // This test process runs under its own name: never found, even by that name.
    let me = stat(std::process::id() as i32).unwrap().comm;
    let mine = Matcher { comm: Some(me), ..Matcher::default() }.find().unwrap();
    assert!(mine.iter().all(|(q, _)| q.pid != std::process::id() as i32));
}
