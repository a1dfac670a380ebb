//! Who is calling: the role and name carried in a certificate issued by the deployment's CA.
//! The role is the subject's organizational unit, the name its common name.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// What a certificate lets its holder do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The backup listener: the only caller agents obey.
    Listener,
    /// A per-server agent.
    Agent,
    /// A person who may start, abort and watch backups.
    Operator,
    /// A person who may only watch.
    Viewer,
    /// The backup software's hook: starts backups and reports copies.
    Hook,
}

impl Role {
    pub const ALL: [Role; 5] =
        [Role::Listener, Role::Agent, Role::Operator, Role::Viewer, Role::Hook];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Listener => "listener",
            Role::Agent => "agent",
            Role::Operator => "operator",
            Role::Viewer => "viewer",
            Role::Hook => "hook",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL.into_iter().find(|r| r.as_str() == s).ok_or_else(|| {
            format!("unknown role {s:?}: expected one of listener, agent, operator, viewer, hook")
        })
    }
}

/// A caller's identity as proven by its certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub role: Role,
    pub name: String,
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.role, self.name)
    }
}

impl Identity {
    /// Reads role and name from a DER certificate that TLS has already verified against the CA.
    pub fn from_der(der: &[u8]) -> Result<Identity, String> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| format!("unreadable client certificate: {e}"))?;
        let subject = cert.subject();
        let name = subject
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .ok_or("client certificate has no common name")?
            .to_string();
        let role = subject
            .iter_organizational_unit()
            .next()
            .and_then(|ou| ou.as_str().ok())
            .ok_or("client certificate has no organizational unit (its role)")?;
        let role = role.parse::<Role>()?;
        Ok(Identity { role, name })
    }
}
