//! The saveset copy on an agent: calls Copy and follows its stream (progress, heartbeats, the
//! volume manifests at the end). No overall deadline, a copy may take hours; silence longer than
//! `timeouts.agent_copy_silence_ms`, or a broken stream, fails it naming how far it got.

use std::time::Duration;

use stillpoint_proto as pb;

use super::ServerCopy;
use crate::agents::{self, Agents};
use crate::convert;

/// Runs `server`'s copy of `group`'s backup on its agent; `progress(done, total)` on every
/// change the agent reports.
pub async fn copy(
    agents: &Agents,
    (backup_id, group): (&str, &str),
    server: &str,
    silence: Duration,
    mut progress: impl FnMut(u64, u64),
) -> Result<ServerCopy, String> {
    let mut client = agents.client(server)?;
    let message = pb::CopyRequest { backup_id: backup_id.to_string(), group: group.to_string() };
    let request = agents::untimed_request(backup_id, server, message);
    let mut stream = client
        .copy(request)
        .await
        .map_err(|s| format!("copy on agent {server}: {}", agents::explain(&s)))?
        .into_inner();
    tracing::info!("copying on the agent");
    let mut last = None;
    loop {
        let message = tokio::time::timeout(silence, stream.message())
            .await
            .map_err(|_| {
                format!(
                    "copy on agent {server}: no progress or heartbeat for {} ms; the agent or the link is gone",
                    silence.as_millis()
                )
            })?
            .map_err(|s| stream_error(server, &s, last))?;
        let Some(event) = message else {
            return Err(format!("copy on agent {server}: the stream ended without a result"));
        };
        match event.event {
            Some(pb::copy_event::Event::Progress(p)) => {
                // Heartbeats repeat the last progress; only changes are news.
                let now = (p.done_bytes, p.total_bytes);
                if last != Some(now) {
                    last = Some(now);
                    progress(p.done_bytes, p.total_bytes);
                }
            }
            Some(pb::copy_event::Event::Done(done)) => {
                return convert::copy_done(done)
                    .map_err(|e| format!("copy on agent {server}: {e}"));
            }
            None => {}
        }
    }
}

/// Why a Copy stream failed, in words: the agent's own refusal or failure as it said it, or a
/// broken link (the agent died, the network failed) with how far the copy had got.
fn stream_error(server: &str, status: &tonic::Status, progress: Option<(u64, u64)>) -> String {
    use tonic::Code;
    match status.code() {
        Code::Unknown | Code::Unavailable | Code::Cancelled | Code::DeadlineExceeded => {
            let (done, total) = progress.unwrap_or((0, 0));
            format!(
                "copy on agent {server} broke off at {done} of {total} bytes: the agent died or the link to it failed ({})",
                status.message()
            )
        }
        _ => format!("copy on agent {server}: {}", status.message()),
    }
}
