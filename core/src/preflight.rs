//! Pre-flight findings: what `stillpoint-listener --check`, `backupctl preflight` and the agent's
//! `Preflight` RPC report, one check each, ok / warn / error with what to do. Types, their wire
//! form and the table people read; the checks themselves live with the daemon that runs them.

use std::fmt;

use std::sync::Arc;

use rustls::pki_types::UnixTime;
use rustls::server::WebPkiClientVerifier;
use stillpoint_proto as pb;

use crate::identity::{Identity, Role};
use crate::tls::TlsFiles;

/// A certificate expiring sooner than this is a warning: renew it before it stops backups.
pub const EXPIRY_WARNING_DAYS: i64 = 30;

/// How bad a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Ok,
    /// Works, but worth a look (an application not running right now).
    Warn,
    /// A backup would fail, or claim more than it holds, until this is fixed.
    Error,
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Level::Ok => "ok",
            Level::Warn => "warn",
            Level::Error => "error",
        })
    }
}

/// One check's result: about `server` (empty for the listener itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub level: Level,
    pub server: String,
    pub check: String,
    pub detail: String,
}

impl Finding {
    pub fn new(level: Level, check: impl Into<String>, detail: impl Into<String>) -> Finding {
        Finding { level, server: String::new(), check: check.into(), detail: detail.into() }
    }

    pub fn ok(check: impl Into<String>, detail: impl Into<String>) -> Finding {
        Finding::new(Level::Ok, check, detail)
    }

    pub fn warn(check: impl Into<String>, detail: impl Into<String>) -> Finding {
        Finding::new(Level::Warn, check, detail)
    }

    pub fn error(check: impl Into<String>, detail: impl Into<String>) -> Finding {
        Finding::new(Level::Error, check, detail)
    }

    /// The same finding, about `server`.
    pub fn on(mut self, server: &str) -> Finding {
        self.server = server.to_string();
        self
    }
}

/// True when any finding is an error: the exit code of both commands.
pub fn has_error(findings: &[Finding]) -> bool {
    findings.iter().any(|f| f.level == Level::Error)
}

/// The table people read: one line per finding, `LEVEL  SERVER  CHECK  DETAIL`, columns aligned,
/// then a summary line counting each level.
pub fn render(findings: &[Finding]) -> String {
    let server_w = findings.iter().map(|f| f.server.len()).max().unwrap_or(0).max("SERVER".len());
    let check_w = findings.iter().map(|f| f.check.len()).max().unwrap_or(0).max("CHECK".len());
    let mut out =
        format!("{:<5}  {:<server_w$}  {:<check_w$}  DETAIL\n", "LEVEL", "SERVER", "CHECK");
    for f in findings {
        let server = if f.server.is_empty() { "-" } else { &f.server };
        out.push_str(&format!(
            "{:<5}  {server:<server_w$}  {:<check_w$}  {}\n",
            f.level.to_string(),
            f.check,
            f.detail
        ));
    }
    let count = |l: Level| findings.iter().filter(|f| f.level == l).count();
    out.push_str(&format!(
        "{} ok, {} warning(s), {} error(s)\n",
        count(Level::Ok),
        count(Level::Warn),
        count(Level::Error)
    ));
    out
}

/// Checks the certificate a daemon presents: issued by the CA in `files.ca`, of `role` (and
/// `name`, when one is required), its key matching, and not expired or about to be at `now`
/// (Unix seconds). One finding named `check`: ok with what it found, or the first problem.
pub fn certificate(
    check: &str,
    files: &TlsFiles,
    role: Role,
    name: Option<&str>,
    now: i64,
) -> Finding {
    match certificate_problem(files, role, name, now) {
        Ok(Ok(detail)) => Finding::ok(check, detail),
        Ok(Err(warning)) => Finding::warn(check, warning),
        Err(error) => Finding::error(check, error),
    }
}

/// Ok(Ok(summary)), Ok(Err(warning)) or Err(error).
fn certificate_problem(
    files: &TlsFiles,
    role: Role,
    name: Option<&str>,
    now: i64,
) -> Result<Result<String, String>, String> {
    let cert_path = files.cert.display();
    let chain = crate::tls::certs_from(&files.cert).map_err(|e| e.to_string())?;
    let leaf = &chain[0];
    let identity = Identity::from_der(leaf).map_err(|e| format!("{cert_path}: {e}"))?;
    let reissue = |what: &str| {
        format!(
            "{cert_path} is {what}; issue one with `backupctl certs issue --role {role} --name {}`",
            name.unwrap_or(&identity.name)
        )
    };
    if identity.role != role {
        return Err(reissue(&format!("a certificate of role {} ({identity})", identity.role)));
    }
    if let Some(name) = name {
        if identity.name != name {
            return Err(reissue(&format!("for {identity}, not {role}:{name}")));
        }
    }
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf)
        .map_err(|e| format!("{cert_path}: unreadable certificate: {e}"))?;
    let not_after = parsed.validity().not_after.timestamp();
    let until = parsed.validity().not_after.to_string();
    if not_after <= now {
        return Err(reissue(&format!("expired on {until}")));
    }
    // The key: rustls refuses a certificate whose key is not this one.
    crate::tls::server_config(files)
        .map_err(|e| format!("{e} (is tls.key the key issued with tls.cert?)"))?;
    let mut roots = rustls::RootCertStore::empty();
    for ca in crate::tls::certs_from(&files.ca).map_err(|e| e.to_string())? {
        roots.add(ca).map_err(|e| format!("{}: {e}", files.ca.display()))?;
    }
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), crate::tls::provider())
            .build()
            .map_err(|e| format!("{}: {e}", files.ca.display()))?;
    let at =
        UnixTime::since_unix_epoch(std::time::Duration::from_secs(u64::try_from(now).unwrap_or(0)));
    verifier.verify_client_cert(leaf, &chain[1..], at).map_err(|e| {
        format!("{cert_path} was not issued by the CA in {}: {e}", files.ca.display())
    })?;
    let days_left = (not_after - now) / 86_400;
    if days_left < EXPIRY_WARNING_DAYS {
        return Ok(Err(format!(
            "{identity}, key matches, issued by the CA, but expires in {days_left} day(s) ({until}): renew it with `backupctl certs renew --name {}` on the CA's host", identity.name
        )));
    }
    Ok(Ok(format!("{identity}, key matches, issued by the CA, valid until {until}")))
}

impl From<&Finding> for pb::Finding {
    fn from(f: &Finding) -> pb::Finding {
        let level = match f.level {
            Level::Ok => pb::FindingLevel::Ok,
            Level::Warn => pb::FindingLevel::Warn,
            Level::Error => pb::FindingLevel::Error,
        };
        pb::Finding {
            level: level as i32,
            server: f.server.clone(),
            check: f.check.clone(),
            detail: f.detail.clone(),
        }
    }
}

impl From<&pb::Finding> for Finding {
    /// A level this side does not know (a newer peer) counts as an error: never report ok
    /// for what was not understood.
    fn from(f: &pb::Finding) -> Finding {
        let level = match pb::FindingLevel::try_from(f.level) {
            Ok(pb::FindingLevel::Ok) => Level::Ok,
            Ok(pb::FindingLevel::Warn) => Level::Warn,
            _ => Level::Error,
        };
        Finding {
            level,
            server: f.server.clone(),
            check: f.check.clone(),
            detail: f.detail.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_aligns_columns_and_counts_each_level() {
        let findings = vec![
            Finding::ok("config", "no problems"),
            Finding::error("quiescer db", "/usr/bin/db-flush is missing: install it").on("fs1"),
            Finding::warn("quiescer app", "no process named app runs").on("fs22"),
        ];
        let table = render(&findings);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines[0], "LEVEL  SERVER  CHECK         DETAIL");
        assert_eq!(lines[1], "ok     -       config        no problems");
        assert_eq!(
            lines[2],
            "error  fs1     quiescer db   /usr/bin/db-flush is missing: install it"
        );
        assert_eq!(lines[3], "warn   fs22    quiescer app  no process named app runs");
        assert_eq!(lines[4], "1 ok, 1 warning(s), 1 error(s)");
        assert!(has_error(&findings));
        assert!(!has_error(&findings[..1]));
    }

    #[test]
    fn a_level_from_the_wire_this_side_does_not_know_is_an_error() {
        let wire = pb::Finding { level: 42, ..Default::default() };
        assert_eq!(Finding::from(&wire).level, Level::Error);
        let unset = pb::Finding::default();
        assert_eq!(Finding::from(&unset).level, Level::Error);
        let f = Finding::warn("x", "y").on("fs1");
        assert_eq!(Finding::from(&pb::Finding::from(&f)), f);
    }
}
