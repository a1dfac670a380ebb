//! `retention GROUP [--dry-run] [--json]`: ApplyRetention. Prints every backup of the group not
//! forgotten before, newest first, with every reason it is kept or why it goes.

use std::io::Write;

use serde::Serialize;
use stillpoint_proto::{ApplyRetentionRequest, ApplyRetentionResponse};

use crate::client::Connection;
use crate::error::{Error, Result};
use crate::view;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The group whose [group.retention] rules to apply
    pub group: String,
    /// Only decide and show: nothing is deleted or marked
    #[arg(long)]
    pub dry_run: bool,
    /// Print the decisions as JSON
    #[arg(long)]
    pub json: bool,
}

/// One decision as `--json` prints it.
#[derive(Debug, Serialize)]
struct DecisionView {
    backup_id: String,
    state: String,
    created: Option<String>,
    keep: bool,
    reasons: Vec<String>,
    dropped: Option<String>,
    forgotten: bool,
    error: Option<String>,
}

pub async fn run(conn: &Connection, args: Args, out: &mut dyn Write) -> Result<()> {
    let mut client = conn.connect()?;
    let request = ApplyRetentionRequest { group: args.group.clone(), dry_run: args.dry_run };
    let reply = client
        .apply_retention(request)
        .await
        .map_err(|s| Error::rpc(format!("apply retention to group {}", args.group), s))?
        .into_inner();
    if args.json {
        let views: Vec<DecisionView> = reply
            .decisions
            .iter()
            .map(|d| DecisionView {
                backup_id: d.backup_id.clone(),
                state: view::state_name(d.state),
                created: view::rfc3339(d.created_unix_ms),
                keep: d.keep,
                reasons: d.reasons.clone(),
                dropped: (!d.dropped.is_empty()).then(|| d.dropped.clone()),
                forgotten: d.forgotten,
                error: (!d.error.is_empty()).then(|| d.error.clone()),
            })
            .collect();
        writeln!(out, "{}", view::json(&views))?;
    } else {
        write!(out, "{}", human(&reply, args.dry_run))?;
    }
    let failed = reply.decisions.iter().filter(|d| !d.error.is_empty()).count();
    if failed > 0 {
        return Err(Error::NotForgotten(format!(
            "{failed} dropped backup(s) could not be forgotten (see ERROR); the next run tries again"
        )));
    }
    Ok(())
}

/// `KEEP`/`FORGET`/`FORGOTTEN` per backup with its reasons, then what forgetting deletes.
fn human(reply: &ApplyRetentionResponse, dry_run: bool) -> String {
    let mut out = String::new();
    for d in &reply.decisions {
        let (verdict, why) = match (d.keep, d.forgotten, d.error.is_empty()) {
            (true, _, _) => ("keep", d.reasons.join(", ")),
            (false, true, _) => ("forgotten", d.dropped.clone()),
            (false, false, true) => ("forget", d.dropped.clone()),
            (false, false, false) => {
                ("ERROR", format!("{}; not forgotten: {}", d.dropped, d.error))
            }
        };
        out.push_str(&format!(
            "{:<10} {}  {:<9}  {}\n",
            verdict,
            d.backup_id,
            view::state_name(d.state),
            why
        ));
    }
    if reply.decisions.is_empty() {
        out.push_str("no backups in this group\n");
    }
    let dropped = reply.decisions.iter().filter(|d| !d.keep).count();
    if dry_run {
        out.push_str(&format!(
            "dry run: {dropped} backup(s) would be forgotten, nothing changed; forgetting deletes {}\n",
            reply.forgets
        ));
    } else {
        out.push_str(&format!("forgetting deletes {}\n", reply.forgets));
    }
    out
}
