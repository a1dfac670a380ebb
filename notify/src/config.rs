//! `[notify]`: when to notify (`on`), the e-mail and webhook targets, and retries; and
//! `Period`, a duration written as people write it ("26h", "90m"), parsed once at the edge.
//! `problems()` lists every mistake at once, by field; secrets are read by `Notifier::new`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// Which backup outcomes are sent. Alerts (no good backup, a missed schedule) count as failures.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum On {
    #[default]
    Failure,
    Success,
    Both,
}

impl On {
    /// Whether an event of this class is sent.
    pub fn sends(self, failure: bool) -> bool {
        match self {
            On::Both => true,
            On::Failure => failure,
            On::Success => !failure,
        }
    }
}

/// A duration in config: `"26h"`, `"1h 30m"`, `"10s"` (humantime's syntax).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Period(pub Duration);

impl std::str::FromStr for Period {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let d = humantime::parse_duration(s.trim()).map_err(|e| {
            format!("{}: {e}; write it like \"26h\", \"90m\" or \"1h 30m\"", crate::clip(s))
        })?;
        if d.is_zero() {
            return Err(format!("{}: must be longer than 0", crate::clip(s)));
        }
        Ok(Period(d))
    }
}

impl<'de> Deserialize<'de> for Period {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl std::fmt::Display for Period {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&crate::render::duration(self.0))
    }
}

/// `[notify]` in the listener's config.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotifyConfig {
    #[serde(default)]
    pub on: On,
    #[serde(default)]
    pub email: Vec<EmailConfig>,
    #[serde(default)]
    pub webhook: Vec<WebhookConfig>,
    /// How many times one message is tried per target before it is given up (logged).
    #[serde(default = "default_tries")]
    pub tries: u32,
    /// The wait before the second try; it doubles each try, up to 5 minutes.
    #[serde(default = "default_backoff")]
    pub backoff: Period,
}

impl Default for NotifyConfig {
    fn default() -> Self {
        NotifyConfig {
            on: On::default(),
            email: Vec::new(),
            webhook: Vec::new(),
            tries: default_tries(),
            backoff: default_backoff(),
        }
    }
}

fn default_tries() -> u32 {
    5
}

fn default_backoff() -> Period {
    Period(Duration::from_secs(2))
}

/// How an SMTP connection is secured.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// Plain connection upgraded with STARTTLS, required (port 587 by default).
    #[default]
    Starttls,
    /// TLS from the first byte (port 465 by default).
    Tls,
    /// No encryption (port 25 by default); refused with a password.
    None,
}

/// `[[notify.email]]`: one SMTP server and the people it writes to.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmailConfig {
    /// The SMTP server's host name (also the name its certificate must carry).
    pub server: String,
    pub port: Option<u16>,
    #[serde(default)]
    pub tls: TlsMode,
    /// Login for AUTH (PLAIN or LOGIN, whichever the server offers); needs `password_file`.
    pub user: Option<String>,
    /// A file holding the password; one trailing newline is not part of it. Read at start,
    /// never logged.
    pub password_file: Option<PathBuf>,
    /// PEM certificates to trust for this server besides the system's roots (a private CA).
    pub ca_file: Option<PathBuf>,
    /// `"Backups <backup@example.com>"` or a bare address.
    pub from: String,
    pub to: Vec<String>,
    /// How long one delivery may take (connect, TLS, AUTH, DATA).
    #[serde(default = "default_timeout")]
    pub timeout: Period,
}

impl EmailConfig {
    pub fn port(&self) -> u16 {
        self.port.unwrap_or(match self.tls {
            TlsMode::Starttls => 587,
            TlsMode::Tls => 465,
            TlsMode::None => 25,
        })
    }
}

/// `[[notify.webhook]]`: an HTTP(S) endpoint that gets the JSON body (`"version": 1`) by POST.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    pub url: String,
    /// A file holding a token sent as `Authorization: Bearer <token>`. Read at start, never
    /// logged.
    pub bearer_token_file: Option<PathBuf>,
    /// PEM certificates to trust for this endpoint besides the system's roots.
    pub ca_file: Option<PathBuf>,
    #[serde(default = "default_timeout")]
    pub timeout: Period,
}

fn default_timeout() -> Period {
    Period(Duration::from_secs(30))
}

impl NotifyConfig {
    /// Whether anything would be sent anywhere.
    pub fn has_targets(&self) -> bool {
        !self.email.is_empty() || !self.webhook.is_empty()
    }

    /// Every problem in the config, one line each, naming its field (`notify.email[0].to`).
    /// Reads the secret and CA files to check them.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.tries == 0 {
            out.push("notify.tries: must be at least 1".to_string());
        }
        for (i, e) in self.email.iter().enumerate() {
            let field = format!("notify.email[{i}]");
            if e.server.trim().is_empty() {
                out.push(format!("{field}.server: empty; give the SMTP server's host name"));
            }
            if let Err(why) = crate::email::mailbox(&e.from) {
                out.push(format!("{field}.from: {why}"));
            }
            if e.to.is_empty() {
                out.push(format!("{field}.to: no recipients; give at least one address"));
            }
            for to in &e.to {
                if let Err(why) = crate::email::mailbox(to) {
                    out.push(format!("{field}.to: {why}"));
                }
            }
            match (&e.user, &e.password_file) {
                (Some(_), None) => {
                    out.push(format!("{field}: user is set but password_file is not"))
                }
                (None, Some(_)) => {
                    out.push(format!("{field}: password_file is set but user is not"))
                }
                (Some(_), Some(path)) => {
                    if let Err(why) = read_secret(path) {
                        out.push(format!("{field}.password_file: {why}"));
                    }
                    if e.tls == TlsMode::None {
                        out.push(format!(
                            "{field}.tls: \"none\" would send the password in clear; use \"starttls\" or \"tls\""
                        ));
                    }
                }
                (None, None) => {}
            }
            if let Some(path) = &e.ca_file {
                if let Err(why) = read_pem_certs(path) {
                    out.push(format!("{field}.ca_file: {why}"));
                }
            }
        }
        for (i, w) in self.webhook.iter().enumerate() {
            let field = format!("notify.webhook[{i}]");
            match reqwest::Url::parse(&w.url) {
                Ok(url) if ["http", "https"].contains(&url.scheme()) => {}
                Ok(url) => {
                    out.push(format!("{field}.url: scheme {:?} is not http or https", url.scheme()))
                }
                Err(e) => out.push(format!("{field}.url: {}: {e}", crate::clip(&w.url))),
            }
            if let Some(path) = &w.bearer_token_file {
                if let Err(why) = read_secret(path) {
                    out.push(format!("{field}.bearer_token_file: {why}"));
                }
            }
            if let Some(path) = &w.ca_file {
                if let Err(why) = read_pem_certs(path) {
                    out.push(format!("{field}.ca_file: {why}"));
                }
            }
        }
        out
    }
}

/// A secret from a file: one trailing newline is not part of it; empty is refused.
pub(crate) fn read_secret(path: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let secret = text.strip_suffix('\n').unwrap_or(&text);
    let secret = secret.strip_suffix('\r').unwrap_or(secret);
    if secret.is_empty() {
        return Err(format!("{}: is empty", path.display()));
    }
    Ok(secret.to_string())
}

/// The PEM certificates in a file, each as DER; none is an error.
pub(crate) fn read_pem_certs(path: &Path) -> Result<Vec<Vec<u8>>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let certs: Vec<Vec<u8>> = rustls_pemfile::certs(&mut bytes.as_slice())
        .map(|c| c.map(|der| der.to_vec()))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: holds no PEM certificate", path.display()));
    }
    Ok(certs)
}

#[cfg(test)]
mod tests;
