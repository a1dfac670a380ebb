//! The notify crate's one error type: what went wrong building a sender from its config, or
//! delivering one message (and whether trying again can help).

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The `[notify]` config is wrong; each problem names its field.
    #[error("notify config: {0}")]
    Config(String),
    /// A message could not be delivered to one target. `permanent`: the receiver refused it
    /// for good (bad address, bad credentials, a 4xx), so trying again cannot help.
    #[error("{target}: {reason}")]
    Delivery { target: String, reason: String, permanent: bool },
}

impl Error {
    /// Whether another try may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Error::Delivery { permanent: false, .. })
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
