//! `agents`: the agents the listener knows, whether they answer and what they are doing.

use std::io::Write;

use stillpoint_proto::ListAgentsRequest;

use crate::client::Connection;
use crate::error::{Error, Result};
use crate::view::{self, AgentView};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Print a JSON array of agents
    #[arg(long)]
    pub json: bool,
}

pub async fn run(conn: &Connection, args: Args, out: &mut dyn Write) -> Result<()> {
    let mut client = conn.connect()?;
    let agents = client
        .list_agents(ListAgentsRequest {})
        .await
        .map_err(|s| Error::rpc("list agents", s))?
        .into_inner()
        .agents;
    if args.json {
        let views: Vec<AgentView> = agents.iter().map(AgentView::from).collect();
        writeln!(out, "{}", view::json(&views))?;
    } else if agents.is_empty() {
        writeln!(out, "no agents")?;
    } else {
        write!(out, "{}", view::agents_human(&agents))?;
    }
    let down: Vec<String> = agents
        .iter()
        .filter(|a| !a.reachable)
        .map(|a| {
            format!("{} ({})", a.server, if a.error.is_empty() { "no answer" } else { &a.error })
        })
        .collect();
    if !down.is_empty() {
        return Err(Error::AgentsUnreachable(format!(
            "{} of {} agents not reachable: {}",
            down.len(),
            agents.len(),
            down.join("; ")
        )));
    }
    Ok(())
}
