//! `certs init|issue`: the deployment's CA and the role certificates it issues, via
//! `stillpoint_core::certs`. Offline; refusals (an existing CA, a bad name) exit 2.

use std::io::Write;
use std::path::PathBuf;

use stillpoint_core::certs::{create_ca, issue, CA_KEY};
use stillpoint_core::identity::Role;

use crate::error::Result;
use crate::view::{self, CertFilesView};

/// The common name of every CA `certs init` makes.
const CA_NAME: &str = "stillpoint CA";

#[derive(Debug, clap::Subcommand)]
pub enum Certs {
    /// Create a new CA (ca.pem, ca.key) in DIR; refuses to replace an existing one
    Init(InitArgs),
    /// Issue NAME.pem and NAME.key for a role, signed by the CA in DIR
    Issue(IssueArgs),
}

#[derive(Debug, clap::Args)]
pub struct InitArgs {
    /// Certificate directory
    #[arg(long, value_name = "D")]
    pub dir: PathBuf,
    /// Validity in days
    #[arg(long, value_name = "N", default_value_t = 3650, value_parser = clap::value_parser!(i64).range(1..))]
    pub days: i64,
    /// Print the files written as JSON
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct IssueArgs {
    /// Certificate directory holding the CA
    #[arg(long, value_name = "D")]
    pub dir: PathBuf,
    /// listener, agent, operator, viewer or hook
    #[arg(long, value_name = "R", value_parser = parse_role)]
    pub role: Role,
    /// The holder's name: its certificate's common name and first DNS name
    #[arg(long, value_name = "N")]
    pub name: String,
    /// Extra DNS name or IP address the holder serves on (repeatable)
    #[arg(long = "host", value_name = "H")]
    pub hosts: Vec<String>,
    /// Validity in days
    #[arg(long, value_name = "N", default_value_t = 825, value_parser = clap::value_parser!(i64).range(1..))]
    pub days: i64,
    /// Print the files written as JSON
    #[arg(long)]
    pub json: bool,
}

fn parse_role(s: &str) -> Result<Role, String> {
    s.parse()
}

pub fn run(certs: Certs, out: &mut dyn Write) -> Result<()> {
    let (files, json) = match certs {
        Certs::Init(args) => {
            let ca = create_ca(&args.dir, CA_NAME, args.days)?;
            let key = args.dir.join(CA_KEY);
            (CertFilesView { ca: shown(ca), cert: None, key: shown(key) }, args.json)
        }
        Certs::Issue(args) => {
            let issued = issue(&args.dir, args.role, &args.name, &args.hosts, args.days)?;
            let view = CertFilesView {
                ca: shown(issued.ca),
                cert: Some(shown(issued.cert)),
                key: shown(issued.key),
            };
            (view, args.json)
        }
    };
    if json {
        writeln!(out, "{}", view::json(&files))?;
    } else {
        if let Some(cert) = &files.cert {
            writeln!(out, "cert: {cert}")?;
        }
        writeln!(out, "key: {}", files.key)?;
        writeln!(out, "ca: {}", files.ca)?;
    }
    Ok(())
}

fn shown(path: PathBuf) -> String {
    path.display().to_string()
}

#[cfg(test)]
mod tests;
