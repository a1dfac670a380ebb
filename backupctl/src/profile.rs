//! Profiles: where the listener is and who we are, kept in a file instead of three environment
//! variables per shell. `~/.config/stillpoint/backupctl.toml` (or `$XDG_CONFIG_HOME/...`, or
//! the file `$STILLPOINT_CONFIG` names):
//!
//! ```toml
//! default = "clinic"
//! [profile.clinic]
//! listener = "https://backup.clinic.lan:7443"
//! certs = "/home/alice/.config/stillpoint/certs"   # relative paths: from this file's folder
//! identity = "alice"
//! ```
//!
//! A value comes from the first of: a flag, its environment variable, the profile chosen by
//! `--profile`/`STILLPOINT_PROFILE`/`default`, the built-in default. `backupctl config show`
//! prints each setting and where it came from.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use clap::parser::ValueSource;
use clap::ArgMatches;
use serde::Deserialize;

use crate::client::Connection;
use crate::error::{Error, Result};

/// The file's shape; unknown keys are refused so a typo is not silently ignored.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    default: Option<String>,
    #[serde(default)]
    profile: BTreeMap<String, Profile>,
}

/// One profile: any subset of the connection options.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    pub listener: Option<String>,
    pub listener_name: Option<String>,
    pub certs: Option<PathBuf>,
    pub identity: Option<String>,
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub timeout: Option<u64>,
}

/// Where a setting came from, for `config show`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Flag,
    Env(&'static str),
    Profile { name: String, file: PathBuf },
    Default,
    Unset,
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Flag => f.write_str("flag"),
            Source::Env(var) => write!(f, "environment {var}"),
            Source::Profile { name, file } => write!(f, "profile {name} ({})", file.display()),
            Source::Default => f.write_str("default"),
            Source::Unset => f.write_str("not set"),
        }
    }
}

/// The connection options a profile can set: the clap id, its environment variable.
pub const SETTINGS: [(&str, &str); 8] = [
    ("listener", "STILLPOINT_LISTENER"),
    ("listener_name", "STILLPOINT_LISTENER_NAME"),
    ("certs", "STILLPOINT_CERTS"),
    ("identity", "STILLPOINT_IDENTITY"),
    ("ca", "STILLPOINT_CA"),
    ("cert", "STILLPOINT_CERT"),
    ("key", "STILLPOINT_KEY"),
    ("timeout", "STILLPOINT_TIMEOUT"),
];

/// The profile file to read, and whether it was named explicitly (then it must exist).
pub fn path() -> Option<(PathBuf, bool)> {
    if let Some(file) = std::env::var_os("STILLPOINT_CONFIG") {
        return Some((PathBuf::from(file), true));
    }
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some((base.join("stillpoint").join("backupctl.toml"), false))
}

/// Fills every connection option that no flag or environment variable set from the chosen
/// profile of `file` (if any), and records where each came from in `conn.sources`.
pub fn apply(
    conn: &mut Connection,
    matches: &ArgMatches,
    file: Option<(PathBuf, bool)>,
) -> Result<()> {
    let chosen = choose(conn.profile.as_deref(), file)?;
    let mut sources = Vec::new();
    for (id, env) in SETTINGS {
        let source = match matches.value_source(id) {
            Some(ValueSource::CommandLine) => Source::Flag,
            Some(ValueSource::EnvVariable) => Source::Env(env),
            other => match &chosen {
                Some((name, file, profile)) if set(conn, id, profile, file) => {
                    Source::Profile { name: name.clone(), file: file.clone() }
                }
                _ if other == Some(ValueSource::DefaultValue) => Source::Default,
                _ => Source::Unset,
            },
        };
        sources.push((id, source));
    }
    conn.sources = sources;
    Ok(())
}

/// The profile to use: `(name, file, profile)`, or none when no file exists and none was asked
/// for. A profile asked for that the file lacks is an error listing those it has.
fn choose(
    asked: Option<&str>,
    file: Option<(PathBuf, bool)>,
) -> Result<Option<(String, PathBuf, Profile)>> {
    let Some((path, explicit)) = file else {
        return match asked {
            Some(name) => Err(Error::Usage(format!(
                "profile {name:?} asked for, but no profile file: set STILLPOINT_CONFIG or HOME"
            ))),
            None => Ok(None),
        };
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit && asked.is_none() => {
            return Ok(None)
        }
        Err(e) => {
            return Err(Error::Usage(format!(
                "profile file {}: {e}{}",
                path.display(),
                if asked.is_some() {
                    " (a profile was asked for with --profile or STILLPOINT_PROFILE)"
                } else {
                    ""
                }
            )))
        }
    };
    let parsed: File = toml::from_str(&text)
        .map_err(|e| Error::Usage(format!("profile file {}: {e}", path.display())))?;
    let Some(name) = asked.map(str::to_string).or(parsed.default.clone()) else {
        return Ok(None);
    };
    let Some(profile) = parsed.profile.get(&name) else {
        let known: Vec<&str> = parsed.profile.keys().map(String::as_str).collect();
        return Err(Error::Usage(format!(
            "profile file {}: no profile {name:?} (it has: {})",
            path.display(),
            if known.is_empty() { "none".to_string() } else { known.join(", ") }
        )));
    };
    if profile.timeout == Some(0) {
        return Err(Error::Usage(format!(
            "profile file {}: profile {name:?}: timeout must be at least 1 second",
            path.display()
        )));
    }
    Ok(Some((name, path, profile.clone())))
}

/// Sets option `id` from the profile if the profile has it; relative paths are taken from the
/// profile file's folder.
fn set(conn: &mut Connection, id: &str, p: &Profile, file: &Path) -> bool {
    let dir = file.parent().unwrap_or(Path::new("."));
    let path = |v: &Option<PathBuf>| v.as_ref().map(|v| dir.join(v));
    match id {
        "listener" => p.listener.clone().map(|v| conn.listener = v).is_some(),
        "listener_name" => p.listener_name.clone().map(|v| conn.listener_name = v).is_some(),
        "certs" => path(&p.certs).map(|v| conn.certs = Some(v)).is_some(),
        "identity" => p.identity.clone().map(|v| conn.identity = Some(v)).is_some(),
        "ca" => path(&p.ca).map(|v| conn.ca = Some(v)).is_some(),
        "cert" => path(&p.cert).map(|v| conn.cert = Some(v)).is_some(),
        "key" => path(&p.key).map(|v| conn.key = Some(v)).is_some(),
        "timeout" => p.timeout.map(|v| conn.timeout = v).is_some(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Cli;
    use clap::{CommandFactory, FromArgMatches};

    fn resolve(args: &[&str], file: &Path) -> Result<Connection> {
        let argv = std::iter::once("backupctl").chain(args.iter().copied());
        let matches =
            Cli::command().try_get_matches_from(argv).map_err(|e| Error::Usage(e.to_string()))?;
        let mut cli = Cli::from_arg_matches(&matches).map_err(|e| Error::Usage(e.to_string()))?;
        apply(&mut cli.connection, &matches, Some((file.to_path_buf(), true)))?;
        Ok(cli.connection)
    }

    fn write(dir: &Path, text: &str) -> PathBuf {
        let file = dir.join("backupctl.toml");
        std::fs::write(&file, text).unwrap_or_else(|e| panic!("{e}"));
        file
    }

    const FILE: &str = r#"
default = "clinic"
[profile.clinic]
listener = "https://backup.clinic.lan:7443"
certs = "certs"
identity = "alice"
[profile.lab]
listener = "https://lab:7443"
identity = "bob"
timeout = 30
"#;

    #[test]
    fn flags_win_over_the_profile_which_wins_over_defaults() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let file = write(dir.path(), FILE);
        let conn = resolve(&["agents"], &file).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(conn.listener, "https://backup.clinic.lan:7443");
        assert_eq!(conn.certs, Some(dir.path().join("certs")), "relative to the file");
        assert_eq!(conn.identity.as_deref(), Some("alice"));
        assert_eq!(conn.timeout, 10, "the default where the profile says nothing");
        let source = |c: &Connection, id: &str| {
            c.sources.iter().find(|(i, _)| *i == id).map(|(_, s)| s.clone())
        };
        assert!(
            matches!(source(&conn, "listener"), Some(Source::Profile { name, .. }) if name == "clinic")
        );
        assert_eq!(source(&conn, "timeout"), Some(Source::Default));
        assert_eq!(source(&conn, "ca"), Some(Source::Unset));

        let conn = resolve(&["--identity", "carol", "--profile", "lab", "agents"], &file)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(conn.identity.as_deref(), Some("carol"), "a flag wins");
        assert_eq!((conn.listener.as_str(), conn.timeout), ("https://lab:7443", 30));
        assert_eq!(source(&conn, "identity"), Some(Source::Flag));
    }

    #[test]
    fn a_missing_profile_or_a_bad_file_says_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let file = write(dir.path(), FILE);
        let err = resolve(&["--profile", "prod", "agents"], &file).err().map(|e| e.to_string());
        assert!(
            err.as_deref().is_some_and(|e| e.contains("no profile \"prod\" (it has: clinic, lab)")),
            "{err:?}"
        );
        let file = write(dir.path(), "[profile.x]\nlistner = \"https://x\"\n");
        let err = resolve(&["agents"], &file).err().map(|e| e.to_string());
        assert!(err.as_deref().is_some_and(|e| e.contains("unknown field `listner`")), "{err:?}");
        let gone = dir.path().join("nope.toml");
        let err = resolve(&["agents"], &gone).err().map(|e| e.to_string());
        assert!(err.as_deref().is_some_and(|e| e.contains("nope.toml")), "{err:?}");
    }
}
