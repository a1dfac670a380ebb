//! The process quiescer against real programs: a bash script appending numbered lines (only
//! builtins, so it never forks a look-alike) found by its name; stopped until every thread
//! shows `T`, locked out by chmod, resumed at thaw; by the real agent binary and its guardian
//! when the agent dies, and by the restarted agent's journal replay when both are killed.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use stillpoint_agent::guardian::Action;
use stillpoint_agent::quiesce::process::{Process, ProcessConfig};
use stillpoint_agent::quiesce::procs::ProcRef;
use stillpoint_agent::quiesce::Quiescer;
use stillpoint_core::san::Array;

use crate::guardian::{mock_san_toml, prepare, BinAgent};
use crate::support::{run, Certs};

/// A script that appends "<n> <time>" lines to `out` about every 10 ms, waiting with bash's
/// builtin `read -t` on a FIFO nobody writes, so it never forks. Ends on SIGTERM unless its
/// environment has IGNORE_TERM. SIGCONTed and killed on Drop.
struct App {
    script: PathBuf,
    out: PathBuf,
    name: String,
    children: Vec<Child>,
}

static NEXT: AtomicU32 = AtomicU32::new(0);

impl App {
    fn new(dir: &Path) -> App {
        // Unique per test process and app, and within the kernel's 15 bytes of comm.
        let name =
            format!("spw{}x{}", std::process::id() % 100_000, NEXT.fetch_add(1, Ordering::SeqCst));
        let out = dir.join(format!("{name}.out"));
        let fifo = dir.join(format!("{name}.fifo"));
        run("mkfifo", &[fifo.to_str().unwrap()]);
        let script = dir.join(&name);
        std::fs::write(
            &script,
            format!(
                "#!/bin/bash\n[ -n \"$IGNORE_TERM\" ] && trap '' TERM\nexec 9<>{fifo:?}\ni=0\nwhile :; do\n  i=$((i+1))\n  echo \"$i $EPOCHREALTIME\" >> {out:?}\n  read -t 0.01 -u 9 _\ndone\n"
            ),
        )
        .unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        App { script, out, name, children: Vec::new() }
    }

    /// Starts one more instance; returns its pid once it has written a line.
    fn start(&mut self) -> i32 {
        self.start_with(&[])
    }

    fn start_with(&mut self, env: &[(&str, &str)]) -> i32 {
        let before = self.lines();
        let child = Command::new(&self.script).envs(env.iter().copied()).spawn().unwrap();
        let pid = child.id() as i32;
        self.children.push(child);
        self.wait_growing(before, Duration::from_secs(5));
        pid
    }

    fn lines(&self) -> usize {
        std::fs::read_to_string(&self.out).map(|t| t.lines().count()).unwrap_or(0)
    }

    /// Waits until the output has grown past `from` lines.
    fn wait_growing(&self, from: usize, within: Duration) -> Duration {
        let since = Instant::now();
        while self.lines() <= from {
            assert!(since.elapsed() < within, "{} wrote nothing more in {within:?}", self.name);
            std::thread::sleep(Duration::from_millis(5));
        }
        since.elapsed()
    }

    fn mode(&self) -> u32 {
        std::fs::metadata(&self.script).unwrap().permissions().mode() & 0o7777
    }

    fn config(&self) -> ProcessConfig {
        ProcessConfig {
            comm: Some(self.name.clone()),
            lockout_executable: Some(self.script.clone()),
            ..config("app")
        }
    }
}

/// A process quiescer called `name` that finds nothing yet and has a 5 s timeout.
fn config(name: &str) -> ProcessConfig {
    ProcessConfig {
        name: name.into(),
        comm: None,
        exe: None,
        pidfile: None,
        notify: None,
        stop_signal: None,
        stop_command: None,
        grace_ms: 0,
        lockout_executable: None,
        lock_command: None,
        unlock_command: None,
        timeout_ms: 5000,
    }
}

impl Drop for App {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = Command::new("kill").args(["-CONT", &c.id().to_string()]).output();
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn state(pid: i32) -> Option<char> {
    stillpoint_agent::quiesce::procs::stat(pid).map(|s| s.state)
}

fn wait_state(pid: i32, running: bool, within: Duration) {
    let since = Instant::now();
    while (state(pid) == Some('T')) == running {
        assert!(since.elapsed() < within, "process {pid} is {:?} after {within:?}", state(pid));
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn resumed_by(action: &Action) -> Vec<i32> {
    match action {
        Action::ResumeAll { procs } => procs.iter().map(|p| p.pid).collect(),
        Action::Each { actions } => actions.iter().flat_map(resumed_by).collect(),
        _ => Vec::new(),
    }
}

#[test]
fn a_program_found_by_name_is_stopped_locked_out_and_resumed_at_thaw() {
    let dir = tempfile::tempdir().unwrap();
    let mut app = App::new(dir.path());
    let pid = app.start();
    let told = dir.path().join("told");
    let mut config = app.config();
    config.notify = Some(vec![
        "/bin/sh".into(),
        "-c".into(),
        format!("echo \"$STILLPOINT_BACKUP_ID\" > {told:?}"),
    ]);
    let q = Process::new(config, "srv");

    let action = q.thaw_action("b1").unwrap().unwrap();
    assert_eq!(resumed_by(&action), vec![pid], "{action:?}");
    assert!(
        matches!(&action, Action::Each { actions } if actions.contains(&Action::RestoreMode { path: app.script.clone(), mode: 0o755 })),
        "{action:?}"
    );
    let detail = q.freeze("b1").unwrap();
    eprintln!("freeze: {detail}");
    assert!(
        detail.contains(&format!("stopped 1 process [{pid} {} (1 thread)]", app.name)),
        "{detail}"
    );
    assert!(detail.starts_with("told users (/bin/sh); locked out "), "{detail}");
    assert_eq!(std::fs::read_to_string(&told).unwrap(), "b1\n");
    assert_eq!(ProcRef::of(pid).unwrap().stopped(), Some(true));
    let lines = app.lines();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(app.lines(), lines, "it wrote while stopped");
    assert_eq!(app.mode(), 0o644);
    // Started again by name while frozen: refused by the lock-out, even for root.
    let again = Command::new(&app.script).spawn();
    assert_eq!(again.map(|_| ()).unwrap_err().kind(), std::io::ErrorKind::PermissionDenied);

    q.thaw("b1").unwrap();
    wait_state(pid, true, Duration::from_secs(5));
    app.wait_growing(lines, Duration::from_secs(2));
    assert_eq!(app.mode(), 0o755);
    q.thaw("b1").unwrap();
}

#[test]
fn a_polite_stop_and_grace_come_first_and_only_what_remains_is_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let mut app = App::new(dir.path());
    // Two instances: the first ends on SIGTERM, the second ignores it.
    let first = app.start();
    let second = app.start_with(&[("IGNORE_TERM", "1")]);

    let mut config = app.config();
    config.stop_signal = Some("TERM".into());
    config.grace_ms = 400;
    let q = Process::new(config, "srv");
    let action = q.thaw_action("b1").unwrap().unwrap();
    assert_eq!(resumed_by(&action), vec![first.min(second), first.max(second)]);
    let detail = q.freeze("b1").unwrap();
    eprintln!("freeze: {detail}");
    assert!(detail.contains("sent SIGTERM to 2 processes"), "{detail}");
    assert!(detail.contains("of a 400ms grace; 1 of 2 exited"), "{detail}");
    assert!(detail.contains(&format!("stopped 1 process [{second} ")), "{detail}");
    assert!(ProcRef::of(first).is_none(), "the polite one should have exited");
    assert_eq!(ProcRef::of(second).unwrap().stopped(), Some(true));
    q.thaw("b1").unwrap();
    wait_state(second, true, Duration::from_secs(5));
}

#[test]
fn a_process_started_after_arming_fails_the_freeze_and_everything_is_undone() {
    let dir = tempfile::tempdir().unwrap();
    let mut app = App::new(dir.path());
    let q = Process::new(app.config(), "srv");
    let action = q.thaw_action("b1").unwrap().unwrap();
    assert_eq!(resumed_by(&action), Vec::<i32>::new());
    // Started between arming and freezing: the guardian could not resume it.
    let pid = app.start();
    let e = format!("{:#}", q.freeze("b1").unwrap_err());
    assert!(
        e.contains(&format!(
            "a matching process started after the guardian was armed: {pid} ({})",
            app.name
        )) && e.contains("resumed what it had stopped, undid the lock-out"),
        "{e}"
    );
    assert_ne!(state(pid), Some('T'));
    assert_eq!(app.mode(), 0o755);
    app.wait_growing(app.lines(), Duration::from_secs(2));
    q.thaw("b1").unwrap();
}

fn process_toml(app: &App) -> String {
    format!(
        "[[quiescer]]\nkind = \"process\"\nname = \"app\"\ncomm = {:?}\nlockout_executable = {:?}\n",
        app.name, app.script
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_guardian_resumes_and_unlocks_when_the_agent_is_killed() {
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::new("srv-pg");
    let array = Array::init(&dir.path().join("array")).unwrap();
    array.create_lun("srv-pg", "data", 1 << 20).unwrap();
    let mut app = App::new(dir.path());
    let pid = app.start();
    let state_dir = dir.path().join("state");
    let mut agent = BinAgent::start(
        dir.path(),
        &certs,
        &state_dir,
        &process_toml(&app),
        &mock_san_toml(&array),
    )
    .await;
    let p = agent.client(&certs).prepare(prepare("b1", 30_000)).await.unwrap().into_inner();
    assert!(p.prepared, "{p:?}");
    assert_eq!(state(pid), Some('T'));
    assert_eq!(app.mode(), 0o644);
    let killed = Instant::now();
    agent.kill9();
    wait_state(pid, true, Duration::from_secs(5));
    eprintln!("guardian resumed the app {}ms after SIGKILL", killed.elapsed().as_millis());
    agent.wait_log(
        &format!(
            "guardian: agent gone; resumed processes [{pid}] of quiescer app; restored mode 755 of {} for quiescer app for backup b1",
            app.script.display()
        ),
        Duration::from_secs(1),
    );
    assert_eq!(app.mode(), 0o755);
    app.wait_growing(app.lines(), Duration::from_secs(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_and_guardian_both_killed_leave_it_stopped_until_the_restart_resumes_it() {
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::new("srv-pd");
    let array = Array::init(&dir.path().join("array")).unwrap();
    array.create_lun("srv-pd", "data", 1 << 20).unwrap();
    let mut app = App::new(dir.path());
    let pid = app.start();
    let state_dir = dir.path().join("state");
    let (quiescers, snapshot) = (process_toml(&app), mock_san_toml(&array));
    let mut agent = BinAgent::start(dir.path(), &certs, &state_dir, &quiescers, &snapshot).await;
    let p = agent.client(&certs).prepare(prepare("b1", 30_000)).await.unwrap().into_inner();
    assert!(p.prepared, "{p:?}");
    let guardian = std::fs::read_to_string(state_dir.join("srv-pd.guardian.pid")).unwrap();
    // Stopped first, so it cannot respawn the guardian between the two kills.
    run("kill", &["-STOP", &agent.pid()]);
    run("kill", &["-KILL", guardian.trim()]);
    agent.kill9();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(state(pid), Some('T'), "resumed with no agent and no guardian");
    assert_eq!(app.mode(), 0o644);

    let restarted = Instant::now();
    let again = BinAgent::start(dir.path(), &certs, &state_dir, &quiescers, &snapshot).await;
    wait_state(pid, true, Duration::from_secs(5));
    eprintln!("double fault: resumed {}ms after restart", restarted.elapsed().as_millis());
    again.wait_log(
        &format!("resumed processes [{pid}] of quiescer app; restored mode 755 of {} for quiescer app for backup b1", app.script.display()),
        Duration::from_secs(1),
    );
    assert_eq!(app.mode(), 0o755);
    app.wait_growing(app.lines(), Duration::from_secs(2));
    drop(again);
    drop(agent);
}

#[test]
fn every_thread_of_a_process_found_by_pidfile_shows_stopped_before_the_freeze_returns() {
    // The agent's own guardian mode runs two threads (its loop and a stdin reader).
    let dir = tempfile::tempdir().unwrap();
    let bin = env!("CARGO_BIN_EXE_stillpoint-agent");
    let mut child = Command::new(bin)
        .arg("guardian")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    let pidfile = dir.path().join("threaded.pid");
    std::fs::write(&pidfile, format!("{pid}\n")).unwrap();
    let p = ProcRef::of(pid).unwrap();
    let since = Instant::now();
    while p.threads() < 2 {
        assert!(since.elapsed() < Duration::from_secs(5), "never saw two threads");
        std::thread::sleep(Duration::from_millis(5));
    }
    let q = Process::new(ProcessConfig { pidfile: Some(pidfile), ..config("threaded") }, "srv");
    let action = q.thaw_action("b1").unwrap().unwrap();
    assert_eq!(action, Action::ResumeAll { procs: vec![p] });
    let detail = q.freeze("b1").unwrap();
    assert!(
        detail.contains(&format!("stopped 1 process [{pid} stillpoint-agen (2 threads)]")),
        "{detail}"
    );
    // Every thread, not only the main one.
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let stat = std::fs::read_to_string(task.unwrap().path().join("stat")).unwrap();
        assert_eq!(stillpoint_agent::quiesce::procs::parse_stat(&stat).unwrap().state, 'T');
    }
    q.thaw("b1").unwrap();
    wait_state(pid, true, Duration::from_secs(5));
    drop(child.stdin.take());
    let _ = child.wait();
}

#[test]
fn a_process_someone_else_stopped_is_left_for_them_to_resume() {
    let dir = tempfile::tempdir().unwrap();
    let mut app = App::new(dir.path());
    let theirs = app.start();
    let ours = app.start();
    run("kill", &["-STOP", &theirs.to_string()]);
    wait_state(theirs, false, Duration::from_secs(5));
    let q = Process::new(app.config(), "srv");
    let action = q.thaw_action("b1").unwrap().unwrap();
    assert_eq!(resumed_by(&action), vec![ours], "the guardian must never resume theirs");
    let detail = q.freeze("b1").unwrap();
    assert!(detail.contains("left 1 process that someone else had stopped as it was"), "{detail}");
    assert!(detail.contains(&format!("stopped 1 process [{ours} ")), "{detail}");
    q.thaw("b1").unwrap();
    wait_state(ours, true, Duration::from_secs(5));
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(state(theirs), Some('T'), "thaw resumed a process it had not stopped");
}

#[test]
fn a_stopped_process_resumed_by_someone_else_makes_the_thaw_say_the_hold_broke() {
    let dir = tempfile::tempdir().unwrap();
    let mut app = App::new(dir.path());
    let pid = app.start();
    let q = Process::new(app.config(), "srv");
    q.thaw_action("b1").unwrap();
    q.freeze("b1").unwrap();
    run("kill", &["-CONT", &pid.to_string()]);
    wait_state(pid, true, Duration::from_secs(5));
    let e = q.thaw("b1").unwrap_err().to_string();
    assert!(
        e.starts_with(&format!("process [{pid}] ran again before the thaw"))
            && e.contains("only crash-consistent"),
        "{e}"
    );
    // The lock-out is undone all the same, and a second thaw has nothing left to do.
    assert_eq!(app.mode(), 0o755);
    q.thaw("b1").unwrap();
}

#[test]
fn a_lock_command_that_fails_half_way_is_undone_and_nothing_is_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let mut app = App::new(dir.path());
    let pid = app.start();
    let marker = dir.path().join("locked");
    let mut config = app.config();
    config.lockout_executable = None;
    config.lock_command =
        Some(vec!["/bin/sh".into(), "-c".into(), format!("touch {marker:?}; exit 3")]);
    config.unlock_command = Some(vec!["/bin/sh".into(), "-c".into(), format!("rm -f {marker:?}")]);
    let q = Process::new(config, "srv");
    q.thaw_action("b1").unwrap();
    let e = format!("{:#}", q.freeze("b1").unwrap_err());
    assert!(e.contains("lock_command: /bin/sh failed with exit status: 3"), "{e}");
    assert!(e.contains("resumed what it had stopped, undid the lock-out"), "{e}");
    assert!(!marker.exists(), "unlock_command did not run after a half-done lock");
    assert_ne!(state(pid), Some('T'));
    q.thaw("b1").unwrap();
}
