//! `schedules`: the listener's schedules (next run, last run and its outcome, suspended), and
//! `schedules suspend NAME` / `resume NAME` (operators only).

use std::io::Write;

use stillpoint_proto::{ListSchedulesRequest, ResumeScheduleRequest, SuspendScheduleRequest};

use crate::client::Connection;
use crate::error::{Error, Result};
use crate::view::{self, schedules::ScheduleView};

#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct Args {
    #[command(subcommand)]
    pub action: Option<Action>,
    /// Print a JSON array of schedules
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Subcommand)]
pub enum Action {
    /// Stop a schedule from starting backups (kept across listener restarts) until resumed
    Suspend(Named),
    /// Let a suspended schedule start backups again, from its next due time
    Resume(Named),
}

#[derive(Debug, clap::Args)]
pub struct Named {
    /// The schedule's name, as in the listener's [[schedule]]
    pub name: String,
    /// Print the schedule as JSON
    #[arg(long)]
    pub json: bool,
}

pub async fn run(conn: &Connection, args: Args, out: &mut dyn Write) -> Result<()> {
    let mut client = conn.connect()?;
    let list = client
        .list_schedules(ListSchedulesRequest {})
        .await
        .map_err(|s| Error::rpc("list schedules", s))?
        .into_inner();
    let Some(action) = args.action else {
        if args.json {
            let views: Vec<ScheduleView> =
                list.schedules.iter().map(|s| ScheduleView::new(s, &list.time_zone)).collect();
            writeln!(out, "{}", view::json(&views))?;
        } else if list.schedules.is_empty() {
            writeln!(out, "no schedules; add a [[schedule]] to the listener's config")?;
        } else {
            write!(out, "{}", view::schedules::schedules_human(&list))?;
        }
        return Ok(());
    };
    let (named, suspend) = match action {
        Action::Suspend(named) => (named, true),
        Action::Resume(named) => (named, false),
    };
    let schedule = if suspend {
        let request = SuspendScheduleRequest { name: named.name.clone() };
        client.suspend_schedule(request).await.map_err(|s| Error::rpc("suspend schedule", s))?
    } else {
        let request = ResumeScheduleRequest { name: named.name.clone() };
        client.resume_schedule(request).await.map_err(|s| Error::rpc("resume schedule", s))?
    }
    .into_inner();
    if named.json {
        writeln!(out, "{}", view::json(&ScheduleView::new(&schedule, &list.time_zone)))?;
        return Ok(());
    }
    let tz = jiff::tz::TimeZone::get(&list.time_zone).unwrap_or(jiff::tz::TimeZone::UTC);
    if schedule.suspended {
        writeln!(out, "schedule {} suspended: it starts nothing until resumed", schedule.name)?;
    } else if schedule.next_unix_ms > 0 {
        let next = view::schedules::local_time(schedule.next_unix_ms, &tz);
        writeln!(out, "schedule {} resumed; next run {next}", schedule.name)?;
    } else {
        writeln!(out, "schedule {} resumed; its expression never runs again", schedule.name)?;
    }
    Ok(())
}
