//! `config show`: the connection settings in effect and where each came from, so a person can
//! tell which profile, variable or flag a command will use before it reaches a listener.

use std::io::Write;

use crate::client::Connection;
use crate::error::Result;
use crate::profile::Source;
use crate::view;

#[derive(Debug, clap::Subcommand)]
pub enum Config {
    /// Print each connection setting, its value and its source
    Show,
}

pub fn run(conn: &Connection, config: Config, out: &mut dyn Write) -> Result<()> {
    match config {
        Config::Show => show(conn, out),
    }
}

fn show(conn: &Connection, out: &mut dyn Write) -> Result<()> {
    let path = |p: &Option<std::path::PathBuf>| p.as_ref().map(|p| p.display().to_string());
    let rows: Vec<Vec<String>> = crate::profile::SETTINGS
        .iter()
        .map(|(id, _)| {
            let value = match *id {
                "listener" => Some(conn.listener.clone()),
                "listener_name" => Some(conn.listener_name.clone()),
                "certs" => path(&conn.certs),
                "identity" => conn.identity.clone(),
                "ca" => path(&conn.ca),
                "cert" => path(&conn.cert),
                "key" => path(&conn.key),
                "timeout" => Some(format!("{}s", conn.timeout)),
                _ => None,
            };
            let source = conn
                .sources
                .iter()
                .find(|(i, _)| i == id)
                .map_or(Source::Unset, |(_, s)| s.clone());
            vec![id.replace('_', "-"), value.unwrap_or_else(|| "-".into()), source.to_string()]
        })
        .collect();
    write!(out, "{}", view::table(&["SETTING", "VALUE", "FROM"], &rows))?;
    Ok(())
}
