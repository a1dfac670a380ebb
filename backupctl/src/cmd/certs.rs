//! `certs init|issue`: the deployment's CA and the role certificates it issues, via
//! `stillpoint_core::certs`. Offline; refusals (an existing CA, a bad name) exit 2.

use std::io::Write;
use std::path::PathBuf;

use stillpoint_core::certs::{create_ca, inspect, issue, renew, CA_KEY};
use stillpoint_core::identity::Role;

use crate::error::{Error, Result};
use crate::view::{self, CertFilesView};

/// The common name of every CA `certs init` makes.
const CA_NAME: &str = "stillpoint CA";

#[derive(Debug, clap::Subcommand)]
pub enum Certs {
    /// Create a new CA (ca.pem, ca.key) in DIR; refuses to replace an existing one
    Init(InitArgs),
    /// Issue NAME.pem and NAME.key for a role, signed by the CA in DIR
    Issue(IssueArgs),
    /// Reissue NAME.pem with its role and names and a new key (old files kept as *.old)
    Renew(RenewArgs),
    /// List every certificate in DIR with its expiry; exit 1 if one expires within --warn-days
    Check(CheckArgs),
}

#[derive(Debug, clap::Args)]
pub struct RenewArgs {
    /// Certificate directory holding the CA and NAME.pem
    #[arg(long, value_name = "D")]
    pub dir: PathBuf,
    /// The holder's name (its file is NAME.pem)
    #[arg(long, value_name = "N")]
    pub name: String,
    /// Validity in days
    #[arg(long, value_name = "N", default_value_t = 825, value_parser = clap::value_parser!(i64).range(1..))]
    pub days: i64,
    /// Print the files written as JSON
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// Certificate directory
    #[arg(long, value_name = "D")]
    pub dir: PathBuf,
    /// Warn (exit 1) for a certificate expiring within this many days
    #[arg(long, value_name = "N", default_value_t = WARN_DAYS)]
    pub warn_days: i64,
    /// Print a JSON array
    #[arg(long)]
    pub json: bool,
}

/// How many days before expiry certificates are warned about, here and by the remote verbs.
pub const WARN_DAYS: i64 = stillpoint_core::preflight::EXPIRY_WARNING_DAYS;

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
        Certs::Renew(args) => {
            let (old, issued) = renew(&args.dir, &args.name, args.days)?;
            if !args.json {
                let role = old.role.map_or("-", Role::as_str);
                writeln!(
                    out,
                    "renewed {role}:{} (was valid until {}); give the holder the new {} and {}",
                    old.name,
                    old.not_after.date(),
                    issued.cert.display(),
                    issued.key.display()
                )?;
            }
            let view = CertFilesView {
                ca: shown(issued.ca),
                cert: Some(shown(issued.cert)),
                key: shown(issued.key),
            };
            (view, args.json)
        }
        Certs::Check(args) => return check(&args, out),
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

/// `certs check`: every `*.pem` in the directory (not `*.old`), soonest expiry first.
fn check(args: &CheckArgs, out: &mut dyn Write) -> Result<()> {
    let entries = std::fs::read_dir(&args.dir)
        .map_err(|e| Error::Usage(format!("certificate directory {}: {e}", args.dir.display())))?;
    let mut certs = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "pem") {
            certs.push(inspect(&path)?);
        }
    }
    certs.sort_by_key(|c| c.not_after);
    let now = time::OffsetDateTime::now_utc();
    let soon: Vec<String> = certs
        .iter()
        .filter(|c| c.days_left(now) < args.warn_days)
        .map(|c| format!("{} ({} days)", c.path.display(), c.days_left(now)))
        .collect();
    if args.json {
        let views: Vec<serde_json::Value> = certs
            .iter()
            .map(|c| {
                serde_json::json!({
                    "file": c.path.display().to_string(),
                    "role": c.role.map(Role::as_str),
                    "name": c.name,
                    "hosts": c.hosts,
                    "not_after": view::rfc3339(c.not_after.unix_timestamp() * 1000),
                    "days_left": c.days_left(now),
                })
            })
            .collect();
        writeln!(out, "{}", view::json(&views))?;
    } else {
        let rows: Vec<Vec<String>> = certs
            .iter()
            .map(|c| {
                let left = c.days_left(now);
                vec![
                    c.path
                        .file_name()
                        .map(|f| f.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                    c.role.map_or("CA", Role::as_str).to_string(),
                    c.name.clone(),
                    c.not_after.date().to_string(),
                    if left < 0 { "expired".into() } else { format!("{left} days") },
                ]
            })
            .collect();
        write!(out, "{}", view::table(&["FILE", "ROLE", "NAME", "EXPIRES", "LEFT"], &rows))?;
    }
    if soon.is_empty() {
        return Ok(());
    }
    Err(Error::CertsExpiring(format!(
        "expiring within {} days: {}; renew each with `backupctl certs renew --dir {} --name NAME`",
        args.warn_days,
        soon.join(", "),
        args.dir.display()
    )))
}

fn shown(path: PathBuf) -> String {
    path.display().to_string()
}

#[cfg(test)]
mod tests;
