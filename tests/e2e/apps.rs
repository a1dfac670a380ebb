//! The sqlite and process quiescers in a real cluster: srv-a holds a SQLite database and stops
//! a program found by name (locked out by command) while a backup runs; with its agent and
//! guardian both killed mid-freeze the program stays stopped and locked out until the restarted
//! agent's journal replay resumes and unlocks it, and the database is writable again at once.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use crate::faults::{start, steerable, wait_state};
use crate::harness::{wait_for, Cluster, Spec};

/// The program's name (its comm) and script file in the cluster root.
const APP: &str = "spe2eapp";

/// srv-a: the steerable hook, then sqlite on `<root>/clinic.db`, then the process quiescer.
fn apps(server: &str, root: &Path) -> String {
    let hook = steerable(server, root);
    if server != "srv-a" {
        return hook;
    }
    let db = root.join("clinic.db");
    let made = Command::new("sqlite3")
        .arg(&db)
        .arg("PRAGMA journal_mode=WAL; CREATE TABLE IF NOT EXISTS t(x);")
        .output()
        .expect("run sqlite3");
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    let script = root.join(APP).display().to_string();
    format!(
        "{hook}\n[[quiescer]]\nkind = \"sqlite\"\nname = \"clinic\"\ndatabases = [{db:?}]\ntimeout_ms = 3000\n\n\
         [[quiescer]]\nkind = \"process\"\nname = \"program\"\ncomm = {APP:?}\n\
         lock_command = [\"/bin/chmod\", \"a-x\", {script:?}]\nunlock_command = [\"/bin/chmod\", \"a+x\", {script:?}]\n",
        db = db.display().to_string(),
    )
}

/// The program: appends a line every ~10 ms with shell builtins only. Killed on Drop.
struct App(Child);

impl App {
    fn start(root: &Path) -> App {
        let fifo = root.join("app.fifo");
        let out = root.join("app.out");
        let made = Command::new("mkfifo").arg(&fifo).status().expect("mkfifo");
        assert!(made.success());
        let script = root.join(APP);
        fs::write(
            &script,
            format!("#!/bin/bash\nexec 9<>{fifo:?}\nwhile :; do echo x >> {out:?}; read -t 0.01 -u 9 _; done\n"),
        )
        .expect("write app");
        fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).expect("chmod app");
        App(Command::new(&script).spawn().expect("start app"))
    }

    fn state(&self) -> char {
        stillpoint_agent::quiesce::stop::state(self.0.id() as i32).unwrap_or('?')
    }
}

impl Drop for App {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-CONT", &self.0.id().to_string()]).status();
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).expect("stat").permissions().mode() & 0o777
}

/// `true` when a write transaction on the database can begin within 200 ms.
fn writable(db: &Path) -> bool {
    Command::new("sqlite3")
        .arg(db)
        .arg(".timeout 200")
        .arg("BEGIN IMMEDIATE; INSERT INTO t VALUES (1); COMMIT;")
        .output()
        .is_ok_and(|o| o.status.success() && o.stderr.is_empty())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_and_guardian_killed_while_an_app_is_stopped_leave_it_to_the_restart() {
    let mut spec = Spec::three(apps);
    spec.lease_ms = 6_000;
    let mut cluster = Cluster::start(spec).await;
    let root = cluster.root().to_path_buf();
    let db = root.join("clinic.db");
    let app = App::start(&root);

    // A good backup first: both quiescers hold and let go.
    let (code, backup) = cluster.backupctl_json(&["start", "--group", "g", "--wait", "complete"]);
    assert_eq!(code, 0, "{backup:#}\n{}", cluster.listener_log());
    let log = cluster.agent("srv-a").proc.log_text();
    let srv_a = backup["cut"]["servers"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["server"] == "srv-a"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(srv_a["hold"], "application", "{srv_a:#}");
    assert_eq!(srv_a["writes_held"], true, "{srv_a:#}");
    let details: Vec<String> = srv_a["steps"]
        .as_array()
        .map(|s| s.iter().map(|s| s["detail"].as_str().unwrap_or_default().to_string()).collect())
        .unwrap_or_default();
    eprintln!("srv-a's steps: {details:#?}");
    assert!(
        details.iter().any(|d| d.starts_with("held a write transaction on 1 database")),
        "{details:?}"
    );
    let stopped = format!("stopped 1 process [{} {APP} (1 thread)]", app.0.id());
    assert!(details.iter().any(|d| d.contains(&stopped)), "{details:?}");
    assert_ne!(app.state(), 'T');
    assert!(writable(&db), "the database stayed held after a good backup\n{log}");

    // srv-c slow to prepare, so srv-a stays frozen while we kill its agent and guardian.
    fs::write(root.join("control/delay-srv-c"), "3").expect("delay");
    let id = start(&cluster);
    wait_for("srv-a's app to stop", Duration::from_secs(10), || (app.state() == 'T').then_some(()))
        .await;
    assert_eq!(mode(&root.join(APP)), 0o644, "not locked out while frozen");
    assert!(!writable(&db), "the database was not held while frozen");
    let guardian =
        fs::read_to_string(root.join("state-srv-a/srv-a.guardian.pid")).expect("guardian pid");
    cluster.agent("srv-a").proc.signal("STOP");
    let killed = Command::new("kill").args(["-KILL", guardian.trim()]).status().expect("kill");
    assert!(killed.success());
    cluster.kill_agent("srv-a");
    // The holder saw its agent go and rolled back; the stopped program waits for a restart.
    // Unreleased, it would stay held until a restart: a loaded machine gets 10 s.
    wait_for("the database to be writable", Duration::from_secs(10), || {
        writable(&db).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(app.state(), 'T', "resumed with no agent and no guardian");
    assert_eq!(mode(&root.join(APP)), 0o644);

    let restarted = Instant::now();
    cluster.restart_agent("srv-a").await;
    wait_for("srv-a's app to run again", Duration::from_secs(5), || {
        (app.state() != 'T').then_some(())
    })
    .await;
    eprintln!("double fault: app resumed {}ms after the restart", restarted.elapsed().as_millis());
    assert_eq!(mode(&root.join(APP)), 0o755, "the lock-out was not undone");
    let log = cluster.agent("srv-a").proc.log_text();
    assert!(
        log.contains(&format!("resumed processes [{}] of quiescer program", app.0.id())),
        "{log}"
    );
    let backup = wait_state(&cluster, &id, &["FAILED", "ABORTED"], Duration::from_secs(30)).await;
    assert!(backup["reason"].as_str().unwrap_or_default().contains("srv-a"), "{backup:#}");
}
