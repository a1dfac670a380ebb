//! `backupctl watch` as a person sees it: the real binary in a real terminal (tmux, 120x30),
//! against the real listener in-process with scripted agents; the screen is captured while a
//! server is frozen (its lease counting down), while copies report progress, and at the end.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use stillpoint_listener::testing::{Cluster, Spec, Step};
use stillpoint_proto::{
    GetBackupRequest, ReportCopyProgressRequest, ReportCopyRequest, StartBackupRequest,
};

/// A private tmux server (its own socket), killed when the test ends however it ends.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn start(command: &str) -> Tmux {
        let tmux = Tmux { socket: format!("stillpoint-watch-{}", std::process::id()) };
        let status = Command::new("tmux")
            .args(["-L", &tmux.socket, "new-session", "-d", "-x", "120", "-y", "30"])
            .arg(format!("{command}; echo EXIT=$?; sleep 600"))
            .status()
            .expect("tmux must be installed (.ci/run installs it)");
        assert!(status.success(), "tmux new-session failed");
        tmux
    }

    fn screen(&self) -> String {
        let out = Command::new("tmux")
            .args(["-L", &self.socket, "capture-pane", "-p"])
            .output()
            .expect("tmux capture-pane");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The screen once `ready` holds, within 30 s.
    fn wait_for(&self, what: &str, ready: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let screen = self.screen();
            if ready(&screen) {
                return screen;
            }
            assert!(Instant::now() < deadline, "no {what} on screen:\n{screen}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux").args(["-L", &self.socket, "kill-server"]).status();
    }
}

/// The row of `server` on `screen`.
fn row<'a>(screen: &'a str, server: &str) -> &'a str {
    screen.lines().find(|l| l.starts_with(server)).unwrap_or("")
}

/// The lease left on `server`'s row, in tenths of a second (`≤8.7s` → 87).
fn lease_left(screen: &str, server: &str) -> Option<u64> {
    let cell = row(screen, server).split_whitespace().find(|c| c.starts_with('≤'))?;
    let secs = cell.trim_start_matches('≤').strip_suffix('s')?;
    let (whole, tenth) = secs.split_once('.')?;
    Some(whole.parse::<u64>().ok()? * 10 + tenth.parse::<u64>().ok()?)
}

fn backupctl(cluster: &Cluster, certs: &Path, args: &str) -> String {
    format!(
        "{} --listener {} --certs {} --identity operator {args}",
        env!("CARGO_BIN_EXE_backupctl"),
        cluster.url(),
        certs.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_draws_a_live_table_in_a_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(dir.path(), Spec::default()).await;
    let mut hook = cluster.client("hook");
    // srv-a stays committing (frozen, its lease running) until released.
    cluster.agent("srv-a").hold(Step::Commit);
    let id = hook
        .start_backup(StartBackupRequest { group: "g".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .backup_id;
    let tmux = Tmux::start(&backupctl(&cluster, &cluster.certs, &format!("watch {id}")));

    let frozen = tmux.wait_for("lease countdown", |s| lease_left(s, "srv-a").is_some());
    let first = lease_left(&frozen, "srv-a").unwrap_or(0);
    assert!(frozen.contains(&format!("backup {id}  group g  COMMITTING")), "{frozen}");
    assert!(row(&frozen, "srv-a").contains("committing"), "{frozen}");
    // The header and each server's row, in a table.
    assert!(frozen.contains("SERVER") && frozen.contains("LEASE LEFT") && frozen.contains("ETA"));
    let later = tmux.wait_for("the countdown moving", |s| {
        lease_left(s, "srv-a").is_some_and(|left| left + 5 <= first)
    });
    assert!(row(&later, "srv-a").contains("committing"), "{later}");

    cluster.agent("srv-a").release(Step::Commit);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let request = GetBackupRequest { backup_id: id.clone() };
        let backup = hook.get_backup(request).await.unwrap().into_inner();
        if backup.servers.iter().any(|s| s.server == "srv-a" && s.phase == "copying") {
            break;
        }
        assert!(Instant::now() < deadline, "srv-a never copying: {backup:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let copying = |done: u64| ReportCopyProgressRequest {
        backup_id: id.clone(),
        server: "srv-a".into(),
        done_bytes: done,
        total_bytes: 4 << 30,
    };
    hook.report_copy_progress(copying(1 << 30)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    hook.report_copy_progress(copying(2 << 30)).await.unwrap();
    let progress = tmux.wait_for("copy progress with rate and ETA", |s| {
        let r = row(s, "srv-a");
        r.contains("2.0 GiB/4.0 GiB") && r.contains("/s")
    });
    assert!(row(&progress, "srv-a").contains("copying"), "{progress}");

    for server in ["srv-a", "srv-b"] {
        let done = ReportCopyRequest {
            backup_id: id.clone(),
            server: server.into(),
            ok: true,
            detail: "tape 7".into(),
        };
        hook.report_copy(done).await.unwrap();
    }
    let end = tmux.wait_for("the outcome", |s| s.contains("EXIT="));
    // Shown with --nocapture: what a person saw.
    println!("frozen:\n{frozen}\ncopying:\n{progress}\nend:\n{end}");
    assert!(end.contains("SUCCEEDED after"), "{end}");
    assert!(end.contains("EXIT=0"), "{end}");
    // Redrawn in place: the table's header is on screen once, not once per event.
    assert_eq!(end.matches("LEASE LEFT").count(), 1, "{end}");
    assert!(row(&end, "srv-a").contains("cleaned"), "{end}");
}
