//! Webhooks: the JSON body POSTed to a URL (HTTP or HTTPS through rustls), with an optional
//! bearer token. 2xx is delivered; 408, 429 and 5xx are tried again; other 4xx are not.

use crate::config::{read_pem_certs, read_secret, WebhookConfig};
use crate::error::{Error, Result};
use crate::render::Message;

/// One `[[notify.webhook]]`, ready to send: token read, client built.
pub struct WebhookTarget {
    name: String,
    url: reqwest::Url,
    /// Never logged; `Debug` is not derived.
    token: Option<String>,
    client: reqwest::Client,
}

impl WebhookTarget {
    pub fn new(c: &WebhookConfig) -> Result<WebhookTarget> {
        let url = reqwest::Url::parse(&c.url)
            .map_err(|e| Error::Config(format!("webhook {}: {e}", crate::clip(&c.url))))?;
        // The name logs show: no query string or user info, which may hold secrets.
        let name = format!(
            "webhook {}://{}{}",
            url.scheme(),
            url.host_str().unwrap_or(""),
            url.port().map(|p| format!(":{p}")).unwrap_or_default()
        ) + url.path();
        let bad = |why: String| Error::Config(format!("{name}: {why}"));
        let token = match &c.bearer_token_file {
            Some(path) => {
                Some(read_secret(path).map_err(|e| bad(format!("bearer_token_file: {e}")))?)
            }
            None => None,
        };
        let mut client = reqwest::Client::builder()
            .timeout(c.timeout.0)
            .user_agent(concat!("stillpoint/", env!("CARGO_PKG_VERSION")));
        if let Some(path) = &c.ca_file {
            for der in read_pem_certs(path).map_err(|e| bad(format!("ca_file: {e}")))? {
                let cert = reqwest::Certificate::from_der(&der)
                    .map_err(|e| bad(format!("ca_file: {e}")))?;
                client = client.add_root_certificate(cert);
            }
        }
        let client = client.build().map_err(|e| bad(format!("HTTP client: {e}")))?;
        Ok(WebhookTarget { name, url, token, client })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub async fn deliver(&self, message: &Message) -> Result<()> {
        let body = serde_json::to_vec(&message.json).map_err(|e| Error::Delivery {
            target: self.name.clone(),
            reason: format!("could not encode the body: {e}"),
            permanent: true,
        })?;
        let mut request = self
            .client
            .post(self.url.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body);
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        let failed = |reason: String, permanent: bool| Error::Delivery {
            target: self.name.clone(),
            reason,
            permanent,
        };
        let response = request.send().await.map_err(|e| {
            let e = e.without_url();
            let mut reason = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                reason.push_str(&format!(": {s}"));
                source = s.source();
            }
            failed(reason, false)
        })?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let retry = status.is_server_error()
            || status == reqwest::StatusCode::REQUEST_TIMEOUT
            || status == reqwest::StatusCode::TOO_MANY_REQUESTS;
        let text = response.text().await.unwrap_or_default();
        Err(failed(format!("answered {status}: {}", crate::clip(&text)), !retry))
    }
}
