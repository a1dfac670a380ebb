//! Pre-flight: `stillpoint-listener --check` (the config, the certificate, the data directory,
//! the copy target, the inventory's addresses and every agent) and the `Preflight` RPC behind
//! `backupctl preflight GROUP` (a group's agents). What fails only at the first backup is found
//! here; nothing is frozen, and what is written (a probe file) is removed at once.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::Path;
use std::time::Duration;

use stillpoint_core::identity::Role;
use stillpoint_core::preflight::Finding;
use stillpoint_proto as pb;
use stillpoint_proto::agent_client::AgentClient;

use crate::config::{Config, CopyConfig, ServerConfig};

/// How long an agent may take to answer its Preflight (its checks connect to local databases
/// with a 3 s bound each); below backupctl's default 10 s, so the table comes back.
pub const AGENT_TIMEOUT: Duration = Duration::from_secs(8);

/// A server's name, its address as configured, and what that resolves to.
pub type Addressed = (String, String, Vec<SocketAddr>);

/// Servers sharing an address, by the text in the config or by what it resolves to; pure.
/// `servers` is each server's name, address and resolved socket addresses.
pub fn shared_addresses(servers: &[Addressed]) -> Vec<Finding> {
    let mut out = Vec::new();
    for (i, (a, a_addr, a_resolved)) in servers.iter().enumerate() {
        for (b, b_addr, b_resolved) in &servers[i + 1..] {
            let same_text = a_addr.eq_ignore_ascii_case(b_addr);
            let shared = a_resolved.iter().find(|sa| b_resolved.contains(sa));
            let how = match (same_text, shared) {
                (true, _) => format!("both have address {a_addr}"),
                (false, Some(sa)) => format!("{a_addr} and {b_addr} both reach {sa}"),
                (false, None) => continue,
            };
            out.push(Finding::error(
                "addresses",
                format!(
                    "servers {a} and {b}: {how}: one agent cannot be both; give each server its own host or port"
                ),
            ));
        }
    }
    out
}

/// Resolves each server's address (a name that does not resolve is its own finding).
fn resolve(servers: &[&ServerConfig]) -> (Vec<Addressed>, Vec<Finding>) {
    let mut resolved = Vec::new();
    let mut findings = Vec::new();
    for s in servers {
        let addrs = match s.address.to_socket_addrs() {
            Ok(addrs) => addrs.collect(),
            Err(e) => {
                findings.push(
                    Finding::error("address", format!("{}: cannot resolve: {e}", s.address))
                        .on(&s.name),
                );
                Vec::new()
            }
        };
        resolved.push((s.name.clone(), s.address.clone(), addrs));
    }
    (resolved, findings)
}

/// One server's agent: reached at its address with the certificate of its name, then its own
/// checks.
async fn agent(config: &Config, server: &ServerConfig) -> Vec<Finding> {
    let name = server.name.as_str();
    let url = format!("https://{}", server.address);
    let channel = match stillpoint_core::tls::channel(&url, name, &config.tls, AGENT_TIMEOUT) {
        Ok(c) => c,
        Err(e) => return vec![Finding::error("reachable", e.to_string()).on(name)],
    };
    let reply = AgentClient::new(channel)
        .max_decoding_message_size(stillpoint_core::MAX_CONTROL_MESSAGE)
        .preflight(pb::AgentPreflightRequest {})
        .await;
    match reply {
        Ok(r) => {
            let mut out = vec![Finding::ok(
                "reachable",
                format!("answers at {} with the certificate of {name}", server.address),
            )
            .on(name)];
            out.extend(r.into_inner().findings.iter().map(|f| Finding::from(f).on(name)));
            out
        }
        Err(status) if status.code() == tonic::Code::Unimplemented => vec![Finding::warn(
            "reachable",
            format!(
                "answers at {} as {name}, but is an older agent without pre-flight checks: upgrade it",
                server.address
            ),
        )
        .on(name)],
        Err(status) => {
            let why = stillpoint_core::tls::explain(&status);
            let detail = if why.contains("not valid for name") || why.contains("NotValidForName") {
                format!(
                    "something answers at {} but its certificate is not for {name} ({why}): the address points at another host, or its certificate names another server",
                    server.address
                )
            } else if status.code() == tonic::Code::PermissionDenied {
                format!(
                    "the agent at {} refuses this listener ({why}): is tls.cert a listener certificate from the agents' CA?",
                    server.address
                )
            } else {
                format!(
                    "no answer at {} ({why}): is the agent running there, and its port open from this host?",
                    server.address
                )
            };
            vec![Finding::error("reachable", detail).on(name)]
        }
    }
}

/// The addresses of `servers` and each one's agent (all at once).
pub async fn agents(config: &Config, servers: &[&ServerConfig]) -> Vec<Finding> {
    let (resolved, mut out) = resolve(servers);
    out.extend(shared_addresses(&resolved));
    let each = futures::future::join_all(servers.iter().map(|s| agent(config, s))).await;
    out.extend(each.into_iter().flatten());
    out
}

/// Writes and removes a probe file in `dir`: what the listener, as this user, can do there.
fn writable(check: &str, what: &str, dir: &Path) -> Finding {
    let probe = dir.join(format!(".stillpoint-preflight-{}", std::process::id()));
    let written = std::fs::write(&probe, b"preflight").and_then(|()| std::fs::remove_file(&probe));
    match written {
        Ok(()) => Finding::ok(check, format!("{what} {} is writable", dir.display())),
        Err(e) => Finding::error(
            check,
            format!(
                "{what} {}: cannot write a file there as uid {}: {e}: create it, owned by the listener's user",
                dir.display(),
                current_uid()
            ),
        ),
    }
}

fn current_uid() -> String {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:")?.split_whitespace().nth(1).map(String::from))
        })
        .unwrap_or_else(|| "?".into())
}

/// What `[copy]` writes into, and what it runs.
fn copy_target(copy: &CopyConfig) -> Finding {
    match copy {
        CopyConfig::Report => Finding::ok("copy", "mode report: the backup software copies"),
        CopyConfig::Command { command } => match command.first() {
            Some(program) if Path::new(program).is_absolute() => match std::fs::metadata(program) {
                Ok(m) if m.is_file() => Finding::ok("copy", format!("command {program} is there")),
                _ => Finding::error(
                    "copy",
                    format!(
                        "command {program} is not a file here: install it or fix [copy] command"
                    ),
                ),
            },
            Some(program) => {
                Finding::ok("copy", format!("command {program} (found on PATH at run time)"))
            }
            None => Finding::error("copy", "command is empty"),
        },
        CopyConfig::Image { target } => writable("copy", "image target", target),
        CopyConfig::Saveset(s) => {
            let repo = s.repository.to_string_lossy();
            if repo.starts_with("s3://") {
                Finding::ok("copy", format!("repository {repo} unlocks (writes to S3 not probed)"))
            } else {
                // The repository's own tmp directory: where every write starts.
                let mut f = writable("copy", "repository", &s.repository.join("tmp"));
                if f.level == stillpoint_core::preflight::Level::Ok {
                    f.detail = format!("repository {repo} unlocks with its secret and is writable");
                }
                f
            }
        }
    }
}

/// Everything `stillpoint-listener --check --config FILE` checks, in order: each config
/// problem, the certificate (role listener, key, CA, expiry), the data directory and the copy
/// target writable by this user, then the inventory's addresses and every agent.
pub async fn check(path: &Path) -> Vec<Finding> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => return vec![Finding::error("config", format!("{}: {e}", path.display()))],
    };
    let config: Config = match toml::from_str(&text) {
        Ok(c) => c,
        Err(e) => {
            return vec![Finding::error(
                "config",
                format!("{}: {}", path.display(), e.to_string().trim_end()),
            )]
        }
    };
    let mut out = Vec::new();
    let cfg = config.clone();
    let problems = tokio::task::spawn_blocking(move || cfg.problems()).await.unwrap_or_default();
    if problems.is_empty() {
        out.push(Finding::ok("config", format!("{} has no problems", path.display())));
    }
    out.extend(problems.into_iter().map(|p| Finding::error("config", p)));
    let now = stillpoint_core::unix_ms() / 1000;
    out.push(stillpoint_core::preflight::certificate(
        "certificate",
        &config.tls,
        Role::Listener,
        None,
        now,
    ));
    out.push(writable("data_dir", "data directory", &config.data_dir));
    out.push(copy_target(&config.copy));
    let servers: Vec<&ServerConfig> = config.servers.iter().collect();
    out.extend(agents(&config, &servers).await);
    out
}

/// The `Preflight` RPC: `group`'s servers, their addresses and agents.
pub async fn group(config: &Config, group: &str) -> crate::Result<Vec<Finding>> {
    let group = config.group(group)?;
    let servers: Vec<&ServerConfig> =
        config.servers.iter().filter(|s| group.servers.contains(&s.name)).collect();
    Ok(agents(config, &servers).await)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn two_servers_at_one_address_are_an_error_naming_both() {
        let servers = vec![
            ("fs1".to_string(), "fs1.lan:7501".to_string(), vec![sa("10.0.0.1:7501")]),
            ("fs2".to_string(), "FS1.lan:7501".to_string(), vec![sa("10.0.0.1:7501")]),
            ("fs3".to_string(), "fs3.lan:7501".to_string(), vec![sa("10.0.0.3:7501")]),
            ("fs4".to_string(), "10.0.0.3:7501".to_string(), vec![sa("10.0.0.3:7501")]),
            ("fs5".to_string(), "10.0.0.3:7502".to_string(), vec![sa("10.0.0.3:7502")]),
        ];
        let found = shared_addresses(&servers);
        let details: Vec<&str> = found.iter().map(|f| f.detail.as_str()).collect();
        assert_eq!(found.len(), 2, "{details:?}");
        assert!(
            details[0].starts_with("servers fs1 and fs2: both have address fs1.lan:7501"),
            "{details:?}"
        );
        assert!(
            details[1].starts_with(
                "servers fs3 and fs4: fs3.lan:7501 and 10.0.0.3:7501 both reach 10.0.0.3:7501"
            ),
            "{details:?}"
        );
        assert!(shared_addresses(&servers[2..3]).is_empty());
    }
}
