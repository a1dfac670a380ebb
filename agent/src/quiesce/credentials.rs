//! Database credentials for the connection-based quiescers (postgres, mysql, redis), and where
//! their server listens: a user name and a password read at connect time from a file, an
//! environment variable or a MySQL option file, never from the agent's config itself. The password's `Debug` is redacted and no error here
//! ever quotes a file's contents.

use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context};

/// A password, kept out of logs: `Debug` prints `Password(..)`.
#[derive(Clone, PartialEq, Eq)]
pub struct Password(String);

impl Password {
    pub fn new(text: impl Into<String>) -> Password {
        Password(text.into())
    }

    /// The password itself, for the one call that sends it to the server.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password(..)")
    }
}

/// Where a quiescer's user and password come from (the `[[quiescer]]` fields they share).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Source {
    /// The user to log in as; with `option_file`, its `[client] user` is used when this is unset.
    pub user: Option<String>,
    /// A file holding the password; one trailing newline is not part of it.
    pub password_file: Option<PathBuf>,
    /// The name of an environment variable of the agent holding the password.
    pub password_env: Option<String>,
    /// A MySQL option file (like `~/.my.cnf` or `/etc/mysql/debian.cnf`): `user` and `password`
    /// from its `[client]` section. mysql only.
    pub option_file: Option<PathBuf>,
}

/// A user name (if any) and a password (if any), read from a [`Source`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Credentials {
    pub user: Option<String>,
    pub password: Option<Password>,
}

impl Source {
    /// Field problems, one line each prefixed with `at`; reads the files to check them but
    /// never quotes what they hold.
    pub fn problems(&self, at: &str, out: &mut Vec<String>) {
        let sources =
            [self.password_file.is_some(), self.password_env.is_some(), self.option_file.is_some()];
        if sources.iter().filter(|s| **s).count() > 1 {
            out.push(format!(
                "{at}: give at most one of password_file, password_env and option_file"
            ));
        }
        for (field, path) in
            [("password_file", &self.password_file), ("option_file", &self.option_file)]
        {
            if let Some(path) = path {
                if !path.is_absolute() {
                    out.push(format!("{at}.{field}: {} is not an absolute path", path.display()));
                }
            }
        }
        if let Some(var) = &self.password_env {
            if var.is_empty() || var.contains('=') {
                out.push(format!("{at}.password_env: {var:?} is not an environment variable name"));
            }
        }
        if let Some(user) = &self.user {
            if user.is_empty() {
                out.push(format!("{at}.user: empty; leave it out or name the user"));
            }
        }
        if let Err(e) = self.read() {
            out.push(format!("{at}: {e:#}"));
        }
    }

    /// Where the password comes from, for an error: the field, never the value.
    pub fn password_origin(&self) -> String {
        match (&self.password_file, &self.password_env, &self.option_file) {
            (Some(f), _, _) => format!("password_file {}", f.display()),
            (_, Some(v), _) => format!("password_env {v}"),
            (_, _, Some(f)) => format!("option_file {}", f.display()),
            _ => "no password configured".into(),
        }
    }

    /// Reads the credentials now (at every connect, so a rotated password is picked up).
    pub fn read(&self) -> anyhow::Result<Credentials> {
        let mut user = self.user.clone();
        let mut password = None;
        if let Some(path) = &self.password_file {
            password = Some(password_file(path)?);
        }
        if let Some(var) = &self.password_env {
            let value = std::env::var(var).map_err(|e| match e {
                std::env::VarError::NotPresent => {
                    anyhow!("password_env: the agent's environment has no variable {var}")
                }
                std::env::VarError::NotUnicode(_) => {
                    anyhow!("password_env: the variable {var} does not hold UTF-8 text")
                }
            })?;
            password = Some(Password::new(value));
        }
        if let Some(path) = &self.option_file {
            let client = option_file(path)?;
            if user.is_none() {
                user = client.user;
            }
            password = client.password;
        }
        Ok(Credentials { user, password })
    }
}

/// The password in `path`, less one trailing newline; an empty file is refused.
fn password_file(path: &Path) -> anyhow::Result<Password> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("password_file: read {}", path.display()))?;
    let text = text.strip_suffix('\n').unwrap_or(&text);
    let text = text.strip_suffix('\r').unwrap_or(text);
    if text.is_empty() {
        bail!("password_file: {} is empty", path.display());
    }
    Ok(Password::new(text))
}

/// `user` and `password` from the `[client]` section of a MySQL option file. Values may be
/// quoted; `!include` and other sections are ignored.
fn option_file(path: &Path) -> anyhow::Result<Credentials> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("option_file: read {}", path.display()))?;
    Ok(parse_option_file(&text))
}

/// The `[client]` section's `user` and `password` (the last of each wins, as for the client).
pub fn parse_option_file(text: &str) -> Credentials {
    let mut in_client = false;
    let mut found = Credentials::default();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(section) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            in_client = section.trim().eq_ignore_ascii_case("client");
            continue;
        }
        if !in_client {
            continue;
        }
        let Some((key, value)) = line.split_once('=') else { continue };
        let value = unquote(value.trim());
        match key.trim().replace('-', "_").as_str() {
            "user" => found.user = Some(value.to_string()),
            "password" => found.password = Some(Password::new(value)),
            _ => {}
        }
    }
    found
}

fn unquote(value: &str) -> &str {
    for q in ['"', '\''] {
        if let Some(inner) = value.strip_prefix(q).and_then(|v| v.strip_suffix(q)) {
            return inner;
        }
    }
    value
}

/// Where a server listens, for messages: the socket path or `host:port` (`default_port` when
/// the port is unset).
pub fn address(
    socket: Option<&Path>,
    host: Option<&str>,
    port: Option<u16>,
    default_port: u16,
) -> String {
    match (socket, host) {
        (Some(socket), _) => socket.display().to_string(),
        (None, Some(host)) => format!("{host}:{}", port.unwrap_or(default_port)),
        (None, None) => "(no socket or host)".into(),
    }
}

/// The problems of a server's `socket` / `host` / `port` fields, one line each prefixed with
/// `at`: exactly one of socket and host, an absolute socket path, a port only with a host.
pub fn endpoint_problems(
    at: &str,
    socket: Option<&Path>,
    host: Option<&str>,
    port: Option<u16>,
    out: &mut Vec<String>,
) {
    match (socket, host) {
        (Some(_), Some(_)) | (None, None) => {
            out.push(format!("{at}: give the server's socket or its host (not both)"))
        }
        (Some(socket), None) if !socket.is_absolute() => {
            out.push(format!("{at}.socket: {} is not an absolute path", socket.display()))
        }
        (Some(_), None) if port.is_some() => {
            out.push(format!("{at}.port: a port goes with host, not with socket"))
        }
        (None, Some(host)) if host.trim().is_empty() => {
            out.push(format!("{at}.host: empty; name the server's host or address"))
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn option_file_client_section_only_and_quotes_removed() {
        let found = parse_option_file(
            "# comment\n[mysqld]\nuser = mysql\n[client]\nuser = backup\npassword = \"s3 cr=t\"\n[mysqldump]\npassword = other\n",
        );
        assert_eq!(found.user.as_deref(), Some("backup"));
        assert_eq!(found.password.as_ref().map(Password::expose), Some("s3 cr=t"));
    }

    #[test]
    fn password_never_shows_in_debug() {
        let c = Credentials { user: Some("u".into()), password: Some(Password::new("hunter2")) };
        assert!(!format!("{c:?}").contains("hunter2"), "{c:?}");
    }

    #[test]
    fn password_file_loses_one_newline_and_refuses_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pw");
        std::fs::write(&path, "pw with space\n").unwrap();
        let src = Source { password_file: Some(path.clone()), ..Source::default() };
        assert_eq!(src.read().unwrap().password.unwrap().expose(), "pw with space");
        std::fs::write(&path, "\n").unwrap();
        let err = format!("{:#}", src.read().unwrap_err());
        assert!(err.contains("is empty"), "{err}");
        let mut out = Vec::new();
        Source { password_env: Some("A".into()), ..src }.problems("q", &mut out);
        assert!(out.iter().any(|p| p.contains("at most one")), "{out:?}");
    }
}
