//! `watch [ID]`: follows a backup's WatchBackup stream until it ends; `watch --all` / `--group G`
//! follow every backup (WatchBackups). Also home of [`follow`], the stream loop `abort` and the
//! progress of `start --wait` share, which resumes a dropped stream after the last entry seen.

use std::collections::HashMap;
use std::io::Write;
use std::time::Duration;

use std::io::IsTerminal;

use stillpoint_proto::{
    Backup, HealthRequest, WatchBackupRequest, WatchBackupsRequest, WatchEvent,
};

use crate::client::{self, about, Client, Connection};
use crate::error::{Error, Result};
use crate::live::{self, Screen};
use crate::view::{self, is_failed, is_terminal, Progress, WatchEventView};

/// Exit 0 when the backup ends SUCCEEDED, 1 when it ends FAILED or ABORTED. With --all or
/// --group, follows every backup (or the group's) live until interrupted; exit 2 when the
/// listener cannot be reached again.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Backup id (default: the newest backup)
    #[arg(conflicts_with_all = ["all", "group"])]
    pub id: Option<String>,
    /// Follow every backup live, each line naming its backup
    #[arg(long, conflicts_with = "group")]
    pub all: bool,
    /// Follow this group's backups live, each line naming its backup
    #[arg(long, value_name = "G")]
    pub group: Option<String>,
    /// One JSON object per event, newline-delimited
    #[arg(long)]
    pub json: bool,
    /// Plain lines even on a terminal (the default into pipes and files)
    #[arg(long, conflicts_with = "json")]
    pub plain: bool,
}

pub async fn run(conn: &Connection, args: Args, out: &mut dyn Write) -> Result<()> {
    let mut client = conn.connect()?;
    if args.all || args.group.is_some() {
        return feed(&mut client, args.group.unwrap_or_default(), args.json, out).await;
    }
    let id = match args.id {
        Some(id) => id,
        None => match client::newest(&mut client).await? {
            Some(b) => b.backup_id,
            None => return Err(Error::Usage("no backups yet: nothing to watch".into())),
        },
    };
    if !args.json && !args.plain && std::io::stdout().is_terminal() {
        let backup = table(&mut client, &id, out).await?;
        return outcome(&backup);
    }
    let mut progress = Progress::default();
    let backup = follow(
        &mut client,
        &id,
        |event| {
            if args.json {
                writeln!(out, "{}", view::json(&WatchEventView::from(event)))?;
            } else {
                for line in progress.lines(event) {
                    writeln!(out, "{line}")?;
                }
            }
            out.flush()?;
            Ok(())
        },
        |_| false,
    )
    .await?;
    outcome(&backup)
}

/// The live table (`live`): events from a task following the stream, and a redraw every 250 ms
/// between them so countdowns and rates move; the last table stays on screen with the outcome.
async fn table(client: &mut Client, id: &str, out: &mut dyn Write) -> Result<Backup> {
    let lease_ms = client.health(HealthRequest {}).await.ok().map(|r| r.into_inner().lease_ms);
    let mut screen = Screen::new(lease_ms);
    let (events, mut incoming) = tokio::sync::mpsc::unbounded_channel();
    let mut follower = client.clone();
    let id_owned = id.to_string();
    let task = tokio::spawn(async move {
        follow(
            &mut follower,
            &id_owned,
            |event| {
                let _ = events.send(event.clone());
                Ok(())
            },
            |_| false,
        )
        .await
    });
    let width = || console_width().unwrap_or(120);
    let mut drawn = 0;
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            event = incoming.recv() => match event {
                Some(event) => screen.observe(&event, now_ms()),
                None => break,
            },
            _ = tick.tick() => {}
        }
        drawn = live::draw(out, &screen.render(now_ms()), drawn, width())?;
    }
    let backup = task.await.map_err(|e| Error::Usage(format!("watch {id}: {e}")))??;
    live::draw(out, &screen.render(now_ms()), drawn, width())?;
    writeln!(out, "{}", view::verdict_line(&backup))?;
    Ok(backup)
}

fn now_ms() -> i64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    now.map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// The terminal's width in columns, asked of the terminal itself.
fn console_width() -> Option<usize> {
    console::Term::stdout().size_checked().map(|(_, cols)| usize::from(cols))
}

/// Prints WatchBackups' events until the listener cannot be reached again. A stream that ends
/// (the listener restarted) or fell behind is subscribed again, saying so: events of the gap
/// are not replayed (`watch ID` shows a backup's whole log).
async fn feed(client: &mut Client, group: String, json: bool, out: &mut dyn Write) -> Result<()> {
    let what = if group.is_empty() {
        "watch every backup".to_string()
    } else {
        format!("watch group {group}")
    };
    let mut progress: HashMap<String, Progress> = HashMap::new();
    let mut attempts = 0u32;
    loop {
        let request = WatchBackupsRequest { group: group.clone() };
        let broken = match client.watch_backups(request).await {
            Err(status) if attempts >= RESUBSCRIBE || !transient(&status) => {
                return Err(Error::rpc(&what, status));
            }
            Err(status) => status,
            Ok(reply) => {
                let mut stream = reply.into_inner();
                loop {
                    match stream.message().await {
                        Ok(Some(event)) => {
                            attempts = 0;
                            if json {
                                writeln!(out, "{}", view::json(&WatchEventView::from(&event)))?;
                            } else {
                                let lines = progress
                                    .entry(event.backup_id.clone())
                                    .or_default()
                                    .lines(&event);
                                for line in lines {
                                    writeln!(out, "{}  {line}", event.backup_id)?;
                                }
                            }
                            out.flush()?;
                        }
                        Ok(None) => {
                            break tonic::Status::unavailable("the listener ended the stream")
                        }
                        Err(status)
                            if transient(&status) || status.code() == tonic::Code::Aborted =>
                        {
                            break status
                        }
                        Err(status) => return Err(Error::rpc(&what, status)),
                    }
                }
            }
        };
        attempts += 1;
        if attempts > RESUBSCRIBE {
            return Err(Error::rpc(&what, broken));
        }
        super::note(&format!("backupctl: {what}: {}; subscribing again", broken.message()));
        tokio::time::sleep(Duration::from_millis(500 * u64::from(attempts))).await;
    }
}

/// A failure a new subscription may get past: no listener yet, a cut link.
fn transient(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
    )
}

/// `Ok` unless the backup ended FAILED or ABORTED.
pub(crate) fn outcome(backup: &Backup) -> Result<()> {
    if is_failed(backup) {
        return Err(Error::BackupFailed {
            id: backup.backup_id.clone(),
            state: view::state_name(backup.state),
            reason: match (backup.reason.as_str(), backup.failed_phase.as_str()) {
                (reason, "") => reason.to_string(),
                ("", phase) => format!("in {phase}"),
                (reason, phase) => format!("in {phase}: {reason}"),
            },
        });
    }
    Ok(())
}

/// How many times a stream that broke after it had started is resubscribed.
const RESUBSCRIBE: u32 = 5;

/// Feeds every event of backup `id` to `on_event` and returns the backup as of the event where
/// `stop` first held, or as of the stream's end once it is terminal. A stream that breaks or
/// ends early is resubscribed; the log entries it replays are not fed twice.
pub(crate) async fn follow(
    client: &mut Client,
    id: &str,
    mut on_event: impl FnMut(&WatchEvent) -> Result<()>,
    stop: impl Fn(&Backup) -> bool,
) -> Result<Backup> {
    let what = format!("watch backup {id}");
    // The last entry fed: a resubscription resumes after it, so none is fed twice or missed.
    let mut after_seq = 0u64;
    let mut last: Option<Backup> = None;
    let mut attempts = 0u32;
    loop {
        let request = about(id, WatchBackupRequest { backup_id: id.to_string(), after_seq });
        let broken = match client.watch_backup(request).await {
            Err(status) if last.is_none() || attempts >= RESUBSCRIBE => {
                return Err(Error::rpc(&what, status));
            }
            Err(status) => status,
            Ok(reply) => {
                let mut stream = reply.into_inner();
                loop {
                    match stream.message().await {
                        Ok(Some(event)) => {
                            if let Some(entry) = &event.entry {
                                if entry.seq <= after_seq {
                                    continue;
                                }
                                after_seq = entry.seq;
                            }
                            on_event(&event)?;
                            if let Some(b) = event.backup {
                                let done = stop(&b);
                                last = Some(b);
                                if done {
                                    return Ok(last.expect("just set"));
                                }
                            }
                        }
                        Ok(None) => {
                            if let Some(b) = last.as_ref().filter(|b| is_terminal(b)) {
                                return Ok(b.clone());
                            }
                            break tonic::Status::unavailable(
                                "the stream ended before the backup reached a terminal state",
                            );
                        }
                        Err(status) => break status,
                    }
                }
            }
        };
        attempts += 1;
        if attempts > RESUBSCRIBE {
            return Err(Error::rpc(&what, broken));
        }
        super::note(&format!("backupctl: {what}: {}; resubscribing", broken.message()));
        tokio::time::sleep(Duration::from_millis(500 * u64::from(attempts))).await;
    }
}
