//! The queue: `Notifier::send` never waits. Each target has its own bounded queue and worker
//! task, so a slow SMTP server delays no webhook; each message is tried `tries` times with
//! doubling backoff, and what is given up is logged (warn) with why.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::{NotifyConfig, On};
use crate::email::EmailTarget;
use crate::error::Result;
use crate::event::Event;
use crate::render::Message;
use crate::webhook::WebhookTarget;

/// Messages waiting per target; more are dropped (and logged) rather than block a backup.
pub const QUEUE: usize = 64;

/// The longest wait between two tries.
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// The wait after try `tried` (1-based) failed: `first`, doubling, at most [`MAX_BACKOFF`].
pub fn backoff(first: Duration, tried: u32) -> Duration {
    let factor = 1u32.checked_shl(tried.saturating_sub(1)).unwrap_or(u32::MAX);
    first.saturating_mul(factor).min(MAX_BACKOFF)
}

enum Target {
    Email(EmailTarget),
    Webhook(WebhookTarget),
}

impl Target {
    fn name(&self) -> &str {
        match self {
            Target::Email(t) => t.name(),
            Target::Webhook(t) => t.name(),
        }
    }

    async fn deliver(&self, message: &Message) -> Result<()> {
        match self {
            Target::Email(t) => t.deliver(message).await,
            Target::Webhook(t) => t.deliver(message).await,
        }
    }
}

/// Sends events to every configured target, in the background.
pub struct Notifier {
    on: On,
    queues: Vec<(String, mpsc::Sender<Arc<Message>>)>,
}

/// The workers of a [`Notifier`], not yet running: [`Workers::spawn`] starts them on the
/// current tokio runtime. Messages sent before wait in the queues.
pub struct Workers {
    workers: Vec<Worker>,
}

struct Worker {
    target: Target,
    queue: mpsc::Receiver<Arc<Message>>,
    tries: u32,
    first_backoff: Duration,
}

impl Notifier {
    /// Reads every secret and CA file and builds the targets; an error names the target and
    /// the field. Nothing is sent yet.
    pub fn new(config: &NotifyConfig) -> Result<(Notifier, Workers)> {
        let mut targets = Vec::new();
        for e in &config.email {
            targets.push(Target::Email(EmailTarget::new(e)?));
        }
        for w in &config.webhook {
            targets.push(Target::Webhook(WebhookTarget::new(w)?));
        }
        let mut queues = Vec::new();
        let mut workers = Vec::new();
        for target in targets {
            let (tx, rx) = mpsc::channel(QUEUE);
            queues.push((target.name().to_string(), tx));
            workers.push(Worker {
                target,
                queue: rx,
                tries: config.tries.max(1),
                first_backoff: config.backoff.0,
            });
        }
        Ok((Notifier { on: config.on, queues }, Workers { workers }))
    }

    /// Whether `event` is sent under `on`.
    pub fn wants(&self, event: &Event) -> bool {
        self.on.sends(event.is_failure())
    }

    /// Queues `event` for every target, if `on` wants it; never waits. A full queue drops the
    /// message for that target, logged.
    pub fn send(&self, event: &Event) {
        if !self.wants(event) || self.queues.is_empty() {
            return;
        }
        let message = Arc::new(Message::of(event));
        for (target, queue) in &self.queues {
            if let Err(e) = queue.try_send(Arc::clone(&message)) {
                let why = match e {
                    mpsc::error::TrySendError::Full(_) => "its queue is full",
                    mpsc::error::TrySendError::Closed(_) => "its sender has stopped",
                };
                tracing::warn!(target, kind = message.kind, group = %message.group, "notification dropped: {why}");
            }
        }
    }
}

/// What became of one message at one target, from [`send_and_wait`].
#[derive(Debug)]
pub struct Delivery {
    pub target: String,
    /// How many tries it took, or the last error and after how many tries it was given up.
    pub result: std::result::Result<u32, (u32, crate::Error)>,
}

/// Sends `event` to every target now, in parallel, and waits for each (with its retries); for
/// a one-shot process such as `backupctl`, which would exit before a queue drained. Nothing
/// when `on` does not want it.
pub async fn send_and_wait(config: &NotifyConfig, event: &Event) -> Result<Vec<Delivery>> {
    if !config.on.sends(event.is_failure()) {
        return Ok(Vec::new());
    }
    let (_, workers) = Notifier::new(config)?;
    let message = Message::of(event);
    let sends = workers.workers.iter().map(|w| async {
        Delivery { target: w.target.name().to_string(), result: w.deliver(&message).await }
    });
    Ok(futures::future::join_all(sends).await)
}

impl Workers {
    /// Starts one task per target; they end when `stop` is cancelled (what is queued then is
    /// not sent) or every `Notifier` handle is gone and the queue is drained.
    pub fn spawn(self, stop: CancellationToken) {
        for worker in self.workers {
            tokio::spawn(worker.run(stop.clone()));
        }
    }
}

impl Worker {
    async fn run(mut self, stop: CancellationToken) {
        loop {
            let message = tokio::select! {
                () = stop.cancelled() => return,
                message = self.queue.recv() => match message {
                    Some(m) => m,
                    None => return,
                },
            };
            let delivered = tokio::select! {
                () = stop.cancelled() => return,
                delivered = self.deliver(&message) => delivered,
            };
            let target = self.target.name();
            match delivered {
                Ok(tries) => {
                    tracing::info!(target, kind = message.kind, group = %message.group, tries, "notification sent")
                }
                Err((tries, e)) => {
                    tracing::warn!(target, kind = message.kind, group = %message.group, tries, error = %e, "notification not sent; giving up")
                }
            }
        }
    }

    /// Tries until delivered, refused for good, or out of tries; how many tries it took.
    async fn deliver(&self, message: &Message) -> std::result::Result<u32, (u32, crate::Error)> {
        let mut tried = 0;
        loop {
            tried += 1;
            match self.target.deliver(message).await {
                Ok(()) => return Ok(tried),
                Err(e) if !e.is_retryable() || tried >= self.tries => return Err((tried, e)),
                Err(e) => {
                    let wait = backoff(self.first_backoff, tried);
                    tracing::warn!(target = self.target.name(), kind = message.kind, tried, error = %e, wait = %crate::render::duration(wait), "notification failed; trying again");
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }
}
