//! How both daemons write their logs to stderr: human text (the default) or one JSON object a
//! line (`--log-format json`, `STILLPOINT_LOG_FORMAT=json`) with the fields of every span the
//! event happened in (`backup`, `group`, `server`, `method`, ...). `RUST_LOG` filters either.

use std::str::FromStr;

use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

/// The log line format, parsed once from the flag or the environment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!(
                "unknown log format {}: use text or json",
                crate::text::clip(other, 32)
            )),
        }
    }
}

/// Installs the global subscriber writing `format` to stderr, filtered by `RUST_LOG` (default
/// `info`). Call once, first thing in `main`.
pub fn init(format: LogFormat) {
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing::subscriber::set_global_default(subscriber(format, filter, std::io::stderr, ansi))
        .unwrap_or_else(|e| eprintln!("logging already set up: {e}"));
}

/// The subscriber [`init`] installs, writing to `writer` (tests capture it).
pub fn subscriber<W>(
    format: LogFormat,
    filter: EnvFilter,
    writer: W,
    ansi: bool,
) -> Box<dyn tracing::Subscriber + Send + Sync>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(writer);
    match format {
        LogFormat::Text => Box::new(builder.with_ansi(ansi).finish()),
        // `spans`: every enclosing span with its fields, outermost first, so a line inside an
        // RPC inside a backup carries both; `span`: the innermost one.
        LogFormat::Json => {
            Box::new(builder.json().with_current_span(true).with_span_list(true).finish())
        }
    }
}

#[cfg(test)]
mod tests;
