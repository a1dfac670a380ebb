//! For tests only (feature `testing`): a real SMTP server requiring STARTTLS and AUTH, and a
//! real HTTPS webhook receiver requiring a bearer token, both from `testdata/receiver.py`
//! (Python's aiosmtpd and http.server) on loopback, with a self-signed certificate made here.
//! What they received is read back as typed values.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Deserialize;

use crate::config::{EmailConfig, NotifyConfig, On, Period, TlsMode, WebhookConfig};

pub const USER: &str = "stillpoint";
pub const PASSWORD: &str = "s3cret-smtp-password";
pub const TOKEN: &str = "webhook-token-123";
pub const FROM: &str = "Stillpoint <backup@example.test>";
pub const TO: [&str; 2] = ["ops@example.test", "oncall@example.test"];

/// An e-mail as the SMTP server received it.
#[derive(Debug, Clone, Deserialize)]
pub struct Mail {
    pub mail_from: String,
    pub rcpt_tos: Vec<String>,
    /// It came after STARTTLS.
    pub tls: bool,
    /// Who authenticated.
    pub login: Option<String>,
    pub from: String,
    pub to: String,
    pub subject: String,
    pub body: String,
}

/// A webhook request as the receiver got it, and what it answered.
#[derive(Debug, Clone, Deserialize)]
pub struct Hook {
    pub path: String,
    pub authorization: Option<String>,
    pub content_type: Option<String>,
    pub body: String,
    pub status: u16,
}

impl Hook {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).expect("the webhook body is JSON")
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum Line {
    Ready { smtp: u16, http: u16 },
    Mail(Mail),
    Hook(Hook),
}

#[derive(Default)]
struct Seen {
    ready: Option<(u16, u16)>,
    mails: Vec<Mail>,
    hooks: Vec<Hook>,
}

/// The servers, running until dropped.
pub struct Receiver {
    child: Child,
    /// Closing it ends the script.
    stdin: Option<ChildStdin>,
    pub smtp_port: u16,
    pub http_port: u16,
    pub dir: PathBuf,
    pub ca_file: PathBuf,
    seen: Arc<Mutex<Seen>>,
}

impl Receiver {
    /// Starts both servers in `dir` (certificate and secret files go there); the first
    /// `fail_first` webhook requests are answered 503. Returns once both listen.
    pub fn start(dir: &Path, fail_first: u32) -> Receiver {
        std::fs::create_dir_all(dir).expect("receiver dir");
        let names = vec!["127.0.0.1".to_string(), "localhost".to_string()];
        let certified = rcgen::generate_simple_self_signed(names).expect("self-signed cert");
        let ca_file = dir.join("receiver.pem");
        let key_file = dir.join("receiver.key");
        std::fs::write(&ca_file, certified.cert.pem()).expect("write cert");
        std::fs::write(&key_file, certified.signing_key.serialize_pem()).expect("write key");
        std::fs::write(dir.join("smtp-password"), format!("{PASSWORD}\n")).expect("password");
        std::fs::write(dir.join("webhook-token"), format!("{TOKEN}\n")).expect("token");
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/receiver.py");
        let mut child = Command::new("python3")
            .arg(script)
            .args(["--cert".as_ref(), ca_file.as_os_str()])
            .args(["--key".as_ref(), key_file.as_os_str()])
            .args(["--user", USER, "--password", PASSWORD, "--token", TOKEN])
            .args(["--fail-first", &fail_first.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start testdata/receiver.py (python3 with aiosmtpd: see .ci/run)");
        let stdout = child.stdout.take().expect("receiver stdout");
        let stdin = child.stdin.take();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let reading = Arc::clone(&seen);
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                let parsed: Line = match serde_json::from_str(&line) {
                    Ok(l) => l,
                    Err(e) => panic!("receiver said {line:?}: {e}"),
                };
                let mut seen = reading.lock().unwrap_or_else(|p| p.into_inner());
                match parsed {
                    Line::Ready { smtp, http } => seen.ready = Some((smtp, http)),
                    Line::Mail(m) => seen.mails.push(m),
                    Line::Hook(h) => seen.hooks.push(h),
                }
            }
        });
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let (smtp_port, http_port) = loop {
            if let Some(ports) = seen.lock().unwrap_or_else(|p| p.into_inner()).ready {
                break ports;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("testdata/receiver.py exited with {status} before it was ready (is aiosmtpd installed? see .ci/run)");
            }
            assert!(std::time::Instant::now() < deadline, "receiver not ready in 30 s");
            std::thread::sleep(Duration::from_millis(20));
        };
        Receiver { child, stdin, smtp_port, http_port, dir: dir.to_path_buf(), ca_file, seen }
    }

    /// `[notify]` sending to both servers: STARTTLS with AUTH to both recipients in [`TO`],
    /// and the webhook at `/hook` with the bearer token; quick retries.
    pub fn config(&self, on: On) -> NotifyConfig {
        NotifyConfig {
            on,
            email: vec![EmailConfig {
                server: "127.0.0.1".into(),
                port: Some(self.smtp_port),
                tls: TlsMode::Starttls,
                user: Some(USER.into()),
                password_file: Some(self.dir.join("smtp-password")),
                ca_file: Some(self.ca_file.clone()),
                from: FROM.into(),
                to: TO.iter().map(|t| t.to_string()).collect(),
                timeout: Period(Duration::from_secs(20)),
            }],
            webhook: vec![WebhookConfig {
                url: format!("https://127.0.0.1:{}/hook", self.http_port),
                bearer_token_file: Some(self.dir.join("webhook-token")),
                ca_file: Some(self.ca_file.clone()),
                timeout: Period(Duration::from_secs(20)),
            }],
            tries: 3,
            backoff: Period(Duration::from_millis(100)),
        }
    }

    pub fn mails(&self) -> Vec<Mail> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).mails.clone()
    }

    pub fn hooks(&self) -> Vec<Hook> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).hooks.clone()
    }

    /// The first e-mail `matching`, waiting for it up to 30 s.
    pub async fn mail(&self, matching: impl Fn(&Mail) -> bool) -> Mail {
        let found = self.wait(|| self.mails().into_iter().find(|m| matching(m))).await;
        found.unwrap_or_else(|| panic!("no such e-mail in 30 s; received: {:#?}", self.mails()))
    }

    /// The first webhook request `matching`, waiting for it up to 30 s.
    pub async fn hook(&self, matching: impl Fn(&Hook) -> bool) -> Hook {
        let found = self.wait(|| self.hooks().into_iter().find(|h| matching(h))).await;
        found.unwrap_or_else(|| panic!("no such webhook in 30 s; received: {:#?}", self.hooks()))
    }

    async fn wait<T>(&self, look: impl Fn() -> Option<T>) -> Option<T> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(found) = look() {
                return Some(found);
            }
            if tokio::time::Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
