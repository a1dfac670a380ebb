//! E-mail over SMTP (lettre): STARTTLS required, TLS from the first byte, or none; AUTH PLAIN
//! or LOGIN; one message to every recipient of a target. A connection per message: the
//! listener sends a few a day.

use lettre::message::header::ContentType;
use lettre::message::Mailbox;
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Tokio1Executor};

use crate::config::{read_pem_certs, read_secret, EmailConfig, TlsMode};
use crate::error::{Error, Result};
use crate::render::Message;

/// An address as the config gives it, `"Name <a@b>"` or `a@b`.
pub(crate) fn mailbox(s: &str) -> Result<Mailbox, String> {
    s.parse::<Mailbox>().map_err(|e| format!("{}: {e}", crate::clip(s)))
}

/// One `[[notify.email]]`, ready to send: secrets read, addresses parsed.
pub struct EmailTarget {
    name: String,
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
    to: Vec<Mailbox>,
}

impl EmailTarget {
    /// Reads the password and CA files and builds the transport; nothing is sent yet.
    pub fn new(c: &EmailConfig) -> Result<EmailTarget> {
        let name = format!("email {}:{}", c.server, c.port());
        let bad = |why: String| Error::Config(format!("{name}: {why}"));
        let from = mailbox(&c.from).map_err(|e| bad(format!("from: {e}")))?;
        let to =
            c.to.iter()
                .map(|t| mailbox(t).map_err(|e| bad(format!("to: {e}"))))
                .collect::<Result<Vec<_>>>()?;
        if to.is_empty() {
            return Err(bad("to: no recipients".into()));
        }
        let mut tls = TlsParameters::builder(c.server.clone());
        if let Some(path) = &c.ca_file {
            for der in read_pem_certs(path).map_err(|e| bad(format!("ca_file: {e}")))? {
                let cert = Certificate::from_der(der).map_err(|e| bad(format!("ca_file: {e}")))?;
                tls = tls.add_root_certificate(cert);
            }
        }
        let tls = tls.build_rustls().map_err(|e| bad(format!("TLS: {e}")))?;
        let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&c.server)
            .port(c.port())
            .timeout(Some(c.timeout.0))
            .tls(match c.tls {
                TlsMode::Starttls => Tls::Required(tls),
                TlsMode::Tls => Tls::Wrapper(tls),
                TlsMode::None => Tls::None,
            });
        match (&c.user, &c.password_file) {
            (Some(user), Some(path)) => {
                let password = read_secret(path).map_err(|e| bad(format!("password_file: {e}")))?;
                builder = builder
                    .credentials(Credentials::new(user.clone(), password))
                    .authentication(vec![Mechanism::Plain, Mechanism::Login]);
            }
            (None, None) => {}
            _ => return Err(bad("give user and password_file together".into())),
        }
        Ok(EmailTarget { name, transport: builder.build(), from, to })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Sends `message` to every recipient in one SMTP transaction.
    pub async fn deliver(&self, message: &Message) -> Result<()> {
        let mut email = lettre::Message::builder()
            .from(self.from.clone())
            .subject(message.subject.clone())
            .header(ContentType::TEXT_PLAIN);
        for to in &self.to {
            email = email.to(to.clone());
        }
        let email = email.body(message.text.clone()).map_err(|e| Error::Delivery {
            target: self.name.clone(),
            reason: format!("could not build the message: {e}"),
            permanent: true,
        })?;
        self.transport.send(email).await.map(drop).map_err(|e| Error::Delivery {
            target: self.name.clone(),
            reason: smtp_reason(&e),
            permanent: e.is_permanent(),
        })
    }
}

/// lettre's error with its causes, since the top one alone often says only "Connection error".
fn smtp_reason(e: &lettre::transport::smtp::Error) -> String {
    let mut reason = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        reason.push_str(&format!(": {s}"));
        source = s.source();
    }
    reason
}
