//! `preflight GROUP`: the listener checks the group's agents (each reached at its address with
//! the certificate of its name, then each agent's own checks) and this prints the table; exit 1
//! when any finding is an error.

use std::io::Write;

use stillpoint_core::preflight::{self, Finding};
use stillpoint_proto::PreflightRequest;

use crate::client::Connection;
use crate::error::{Error, Result};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The group whose servers to check
    pub group: String,
    /// Print a JSON array of findings ({level, server, check, detail})
    #[arg(long)]
    pub json: bool,
}

pub async fn run(conn: &Connection, args: Args, out: &mut dyn Write) -> Result<()> {
    let mut client = conn.connect()?;
    let findings: Vec<Finding> = client
        .preflight(PreflightRequest { group: args.group.clone() })
        .await
        .map_err(|s| Error::rpc(format!("preflight {}", args.group), s))?
        .into_inner()
        .findings
        .iter()
        .map(Finding::from)
        .collect();
    if args.json {
        let rows: Vec<serde_json::Value> = findings
            .iter()
            .map(|f| {
                serde_json::json!({
                    "level": f.level.to_string(),
                    "server": f.server,
                    "check": f.check,
                    "detail": f.detail,
                })
            })
            .collect();
        writeln!(out, "{}", serde_json::Value::Array(rows))?;
    } else {
        write!(out, "{}", preflight::render(&findings))?;
    }
    if preflight::has_error(&findings) {
        let errors = findings.iter().filter(|f| f.level == preflight::Level::Error).count();
        return Err(Error::Preflight(format!(
            "preflight of group {}: {errors} error(s); fix them before the first backup",
            args.group
        )));
    }
    Ok(())
}
