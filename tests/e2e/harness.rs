//! `Cluster`: a listener, agents and the causal writer as real processes from the target dir,
//! over loopback mTLS, on a mock SAN array in a temp dir (in a loop-mounted XFS image where the
//! temp dir cannot reflink, as `backupctl san init` makes it). Everything it starts is killed,
//! and the array unmounted, on drop. Readiness is a health RPC with a deadline, never a bare
//! sleep.

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use stillpoint_core::certs;
use stillpoint_core::identity::Role;
use stillpoint_core::san::Array;
use stillpoint_core::tls::TlsFiles;
use stillpoint_proto as pb;

/// A binary built by this workspace, next to the test executable's `deps/` directory.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace` (or `cargo test --workspace`) first",
        path.display()
    );
    path
}

fn free_port() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], stillpoint_core::testing::spare_loopback_port()))
}

/// How a cluster's copy phase works.
#[derive(Clone)]
pub enum Copy {
    /// Run `before` (shell, may be empty), then `cp --sparse=always` every snapshot into
    /// `<dest or root/copies>/<backup>/<server>-<volume>.img`.
    Command { before: String, dest: Option<PathBuf> },
    /// Wait for `backupctl copied`.
    Report,
    /// The built-in copier into a saveset repository the harness creates at
    /// `<root>/saveset`, unlocked by `<root>/saveset.pass`; `verify` is the listener's
    /// after-backup check (`none`, `index`, `read-data`).
    Saveset { verify: &'static str },
    /// The saveset copier on each agent (`[copy] on = "agent"`), into the repository as for
    /// `Saveset`. `agent` says, per server, whether its agent gets a `[saveset]` section
    /// (`None`: it has none) and its `copy_delay_ms_per_mib`.
    SavesetOnAgent { verify: &'static str, agent: fn(server: &str) -> Option<u64> },
    /// IDR: a mountable image of each snapshot under `<root>/idr/<backup>/<server>-<volume>.img`.
    Image,
}

/// The passphrase of the saveset repository a `Copy::Saveset` cluster creates.
pub const SAVESET_PASSPHRASE: &str = "e2e saveset passphrase";

#[derive(Clone)]
pub struct Spec {
    pub servers: Vec<String>,
    pub lun_bytes: u64,
    pub lease_ms: u64,
    pub copy: Copy,
    /// The `[[quiescer]]` TOML for a server, given the cluster root.
    pub quiescers: fn(server: &str, root: &Path) -> String,
    /// Extra lines for a server's `[snapshot]` table (e.g. the mock SAN's latency knob).
    pub provider_extra: fn(server: &str) -> String,
    /// LUN names per server; every one is created.
    pub volumes: fn(server: &str) -> Vec<String>,
    /// Route the listener's link to each agent through a chaos proxy.
    pub proxied: bool,
    pub sweep_interval_ms: u64,
    /// `timeouts.agent_copy_silence_ms`: how long a copy on an agent may stay silent.
    pub agent_copy_silence_ms: u64,
    /// Run some agents under a wrapper command (e.g. a time namespace).
    pub agent_wrapper: fn(server: &str) -> Vec<String>,
    /// Give srv-a a real filesystem to fsfreeze and a real process to SIGSTOP, so every check
    /// can ask the kernel whether anything was left frozen or stopped.
    pub probes: bool,
    /// TOML appended to the listener's config (e.g. more `[[group]]`s).
    pub listener_extra: String,
    /// Extra lines for group `g` (e.g. `require_hold`, `thaw`).
    pub group_extra: &'static str,
    /// Give the listener and every agent a `[metrics]` endpoint on a loopback port of its own
    /// (`Cluster::listener_metrics`, `Agent::metrics`).
    pub metrics: bool,
    /// Run the listener with `--log-format json`.
    pub json_logs: bool,
    /// With `Copy::Saveset`: change tracking, bases kept in `<array>/bases` (`[copy] base_dir`).
    pub saveset_base_dir: bool,
    /// Environment variables for the listener (e.g. a failpoint).
    pub listener_env: Vec<(String, String)>,
}

fn nothing(_: &str) -> String {
    String::new()
}

fn one_volume(_: &str) -> Vec<String> {
    vec!["data".to_string()]
}

fn no_wrapper(_: &str) -> Vec<String> {
    Vec::new()
}

impl Spec {
    pub fn three(quiescers: fn(&str, &Path) -> String) -> Spec {
        Spec {
            servers: ["srv-a", "srv-b", "srv-c"].map(String::from).into(),
            lun_bytes: 8 << 20,
            lease_ms: 10_000,
            copy: Copy::Command { before: String::new(), dest: None },
            quiescers,
            provider_extra: nothing,
            volumes: one_volume,
            proxied: false,
            sweep_interval_ms: 60_000,
            agent_copy_silence_ms: 30_000,
            agent_wrapper: no_wrapper,
            probes: false,
            listener_extra: String::new(),
            group_extra: "",
            metrics: false,
            json_logs: false,
            saveset_base_dir: false,
            listener_env: Vec::new(),
        }
    }
}

/// The causal writer's pause/resume hooks as an exec quiescer.
pub fn writer_quiescer(server: &str, root: &Path) -> String {
    let writer = bin("causal-writer");
    let control = root.join("control");
    format!(
        "[[quiescer]]\nkind = \"exec\"\nname = \"writer\"\ntimeout_ms = 10000\npre_freeze = [{w:?}, \"pause\", {c:?}, {server:?}]\npost_thaw = [{w:?}, \"resume\", {c:?}, {server:?}]\n",
        w = writer.display().to_string(),
        c = control.display().to_string(),
    )
}

pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(mut command: Command, log: PathBuf) -> Proc {
        let out = fs::OpenOptions::new().create(true).append(true).open(&log).expect("open log");
        let err = out.try_clone().expect("clone log handle");
        let child =
            command.stdin(Stdio::null()).stdout(out).stderr(err).spawn().expect("spawn process");
        Proc { child, log }
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends a signal (`STOP`, `CONT`, `KILL`...) to the process; it is our own child, whose
    /// pid we still hold, so no other process can be hit.
    pub fn signal(&self, signal: &str) {
        let _ = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status();
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.signal("CONT");
        self.kill();
    }
}

pub struct Agent {
    pub name: String,
    pub addr: SocketAddr,
    pub config: PathBuf,
    pub proc: Proc,
    /// The chaos proxy on the listener's link to this agent, when the spec asked for one.
    pub proxy: Option<stillpoint_tests::proxy::Proxy>,
    /// Its metrics endpoint, when the spec asked for them.
    pub metrics: Option<SocketAddr>,
}

pub struct Cluster {
    pub root: tempfile::TempDir,
    pub spec: Spec,
    pub certs: PathBuf,
    /// The array, whose snapshots are reflink clones; unmounted when the cluster drops.
    pub array: Array,
    pub listener_addr: SocketAddr,
    pub listener_config: PathBuf,
    pub listener: Option<Proc>,
    pub agents: Vec<Agent>,
    pub writer: Option<Proc>,
    pub probe: Option<Probe>,
    /// The listener's metrics endpoint, when the spec asked for them.
    pub listener_metrics: Option<SocketAddr>,
}

/// A small ext4 filesystem on a loop device that srv-a's agent freezes, and a process it stops.
/// Dropping it always thaws, resumes, unmounts and kills, even after a failed test.
pub struct Probe {
    pub mount: PathBuf,
    pub app: Child,
}

impl Probe {
    fn make(root: &Path) -> Probe {
        let image = root.join("probe.img");
        let mount = root.join("probe");
        fs::create_dir_all(&mount).expect("probe mount point");
        fs::File::create(&image).and_then(|f| f.set_len(16 << 20)).expect("probe image");
        let run = |cmd: &mut Command| {
            let out = cmd.output().expect("run probe setup");
            assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
        };
        run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&image));
        run(Command::new("mount").args(["-o", "loop"]).arg(&image).arg(&mount));
        let app = Command::new("sleep").arg("100000").spawn().expect("spawn probe app");
        fs::write(root.join("probe-app.pid"), app.id().to_string()).expect("pidfile");
        Probe { mount, app }
    }

    /// The agent config lines for srv-a's probe quiescers.
    fn quiescers(root: &Path) -> String {
        format!(
            "[[quiescer]]\nkind = \"fsfreeze\"\nmount = {mount:?}\n\n[[quiescer]]\nkind = \"stop\"\nname = \"probe-app\"\npidfile = {pid:?}\n",
            mount = root.join("probe").display().to_string(),
            pid = root.join("probe-app.pid").display().to_string(),
        )
    }

    /// Thaws the probe filesystem; `true` if it was frozen (FITHAW succeeded), which after a
    /// backup has ended means something was LEFT FROZEN.
    pub fn was_left_frozen(&self) -> bool {
        let dir = fs::File::open(&self.mount).expect("open probe mount");
        stillpoint_core::sys::thaw(&dir).is_ok()
    }

    /// `true` if the probe application is stopped (state `T`).
    pub fn app_stopped(&self) -> bool {
        let stat = fs::read_to_string(format!("/proc/{}/stat", self.app.id())).unwrap_or_default();
        stat.rsplit(')').next().map(str::trim_start).is_some_and(|rest| rest.starts_with('T'))
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        if let Ok(dir) = fs::File::open(&self.mount) {
            let _ = stillpoint_core::sys::thaw(&dir);
        }
        let _ = Command::new("kill").arg("-CONT").arg(self.app.id().to_string()).status();
        let _ = self.app.kill();
        let _ = self.app.wait();
        let _ = Command::new("umount").arg("-l").arg(&self.mount).status();
    }
}

impl Cluster {
    pub async fn start(spec: Spec) -> Cluster {
        let root = tempfile::tempdir().expect("temp dir");
        let path = root.path().to_path_buf();
        let certs = path.join("certs");
        certs::create_ca(&certs, "stillpoint test CA", 30).expect("create CA");
        let local = ["127.0.0.1".to_string(), "localhost".to_string()];
        certs::issue(&certs, Role::Listener, "listener", &local, 30).expect("listener cert");
        for (role, name) in
            [(Role::Operator, "operator"), (Role::Viewer, "viewer"), (Role::Hook, "hook")]
        {
            certs::issue(&certs, role, name, &[], 30).expect("client cert");
        }
        fs::create_dir_all(path.join("control")).expect("control dir");
        fs::create_dir_all(path.join("copies")).expect("copies dir");
        let array = Array::init(&path.join("array")).expect("array");
        let probe = spec.probes.then(|| Probe::make(&path));
        let saveset = match &spec.copy {
            Copy::Saveset { .. } | Copy::SavesetOnAgent { .. } => {
                let repository = path.join("saveset");
                let secret = stillpoint_saveset::Secret::passphrase(SAVESET_PASSPHRASE);
                stillpoint_saveset::Repository::init(&repository, &secret)
                    .expect("init saveset repository");
                let pass = path.join("saveset.pass");
                fs::write(&pass, format!("{SAVESET_PASSPHRASE}\n")).expect("write passphrase");
                format!(
                    "repository = {repo:?}\npassphrase_file = {pass:?}\n",
                    repo = repository.display().to_string(),
                    pass = pass.display().to_string(),
                )
            }
            Copy::Command { .. } | Copy::Report | Copy::Image => String::new(),
        };

        let mut agents = Vec::new();
        for server in &spec.servers {
            certs::issue(&certs, Role::Agent, server, &local, 30).expect("agent cert");
            let volumes = (spec.volumes)(server);
            for volume in &volumes {
                array.create_lun(server, volume, spec.lun_bytes).expect("create LUN");
            }
            let addr = free_port();
            let config = path.join(format!("agent-{server}.toml"));
            let body = format!(
                "server = {server:?}\nlisten = \"{addr}\"\nstate_dir = {state:?}\nvolumes = {volumes:?}\n\n[tls]\n{tls}\n{quiescers}\n[snapshot]\nprovider = \"mock-san\"\narray = {array:?}\n{extra}\n",
                tls = tls_toml(&certs, server),
                state = path.join(format!("state-{server}")).display().to_string(),
                quiescers = (spec.quiescers)(server, &path)
                    + &if probe.is_some() && server == "srv-a" { Probe::quiescers(&path) } else { String::new() },
                array = array.root().display().to_string(),
                extra = (spec.provider_extra)(server),
            );
            let body = match &spec.copy {
                Copy::SavesetOnAgent { agent, .. } => match agent(server) {
                    Some(delay) => {
                        let bases = if spec.saveset_base_dir {
                            let dir = array.root().join(format!("bases-{server}"));
                            format!("base_dir = {:?}\n", dir.display().to_string())
                        } else {
                            String::new()
                        };
                        format!(
                            "{body}\n[saveset]\n{saveset}copy_delay_ms_per_mib = {delay}\n{bases}"
                        )
                    }
                    None => body,
                },
                Copy::Command { .. } | Copy::Report | Copy::Saveset { .. } | Copy::Image => body,
            };
            let metrics = spec.metrics.then(free_port);
            let body = match metrics {
                Some(at) => format!("{body}\n[metrics]\nlisten = \"{at}\"\n"),
                None => body,
            };
            fs::write(&config, body).expect("write agent config");
            let proc = spawn_agent(
                &(spec.agent_wrapper)(server),
                &config,
                &path.join(format!("agent-{server}.log")),
            );
            let proxy = if spec.proxied {
                Some(stillpoint_tests::proxy::Proxy::start(addr).await.expect("start proxy"))
            } else {
                None
            };
            agents.push(Agent { name: server.clone(), addr, config, proc, proxy, metrics });
        }

        let listener_addr = free_port();
        let listener_config = path.join("listener.toml");
        let copy = match &spec.copy {
            Copy::Command { before, dest } => format!(
                "[copy]\nmode = \"command\"\ncommand = [\"/bin/sh\", \"-c\", {script:?}]\n",
                script = format!(
                    "{before}\nmkdir -p {d}/$STILLPOINT_BACKUP_ID && cp --sparse=always \"$STILLPOINT_SNAPSHOT\" {d}/$STILLPOINT_BACKUP_ID/$STILLPOINT_SERVER-$STILLPOINT_VOLUME.img",
                    d = dest.clone().unwrap_or_else(|| path.join("copies")).display()
                )
            ),
            Copy::Report => "[copy]\nmode = \"report\"\n".to_string(),
            Copy::Image => {
                let target = path.join("idr");
                fs::create_dir_all(&target).expect("IDR target");
                format!("[copy]\nmode = \"image\"\ntarget = {:?}\n", target.display().to_string())
            }
            Copy::Saveset { verify } => {
                let bases = if spec.saveset_base_dir {
                    format!("base_dir = {:?}\n", array.root().join("bases").display().to_string())
                } else {
                    String::new()
                };
                format!("[copy]\nmode = \"saveset\"\n{saveset}verify = {verify:?}\n{bases}")
            }
            Copy::SavesetOnAgent { verify, .. } => format!(
                "[copy]\nmode = \"saveset\"\non = \"agent\"\n{saveset}verify = {verify:?}\n"
            ),
        };
        let servers: String = agents
            .iter()
            .map(|a| {
                let addr = a.proxy.as_ref().map_or(a.addr, |p| p.addr);
                format!("[[server]]\nname = {:?}\naddress = \"{addr}\"\n", a.name)
            })
            .collect();
        let body = format!(
            "data_dir = {data:?}\nlisten = \"{listener_addr}\"\n\n[tls]\n{tls}\n[timeouts]\nlease_ms = {lease}\nsnapshot_budget_ms = {budget}\nmargin_ms = {margin}\nrpc_ms = 2000\nsweep_interval_ms = {sweep}\nagent_copy_silence_ms = {silence}\n\n{servers}\n[[group]]\nname = \"g\"\nservers = {names:?}\n{group_extra}\n{copy}",
            data = path.join("listener-data").display().to_string(),
            tls = tls_toml(&certs, "listener"),
            lease = spec.lease_ms,
            budget = spec.lease_ms / 4,
            margin = spec.lease_ms / 8,
            sweep = spec.sweep_interval_ms,
            silence = spec.agent_copy_silence_ms,
            names = spec.servers,
            group_extra = spec.group_extra,
        );
        let body = format!("{body}\n{}", spec.listener_extra);
        let listener_metrics = spec.metrics.then(free_port);
        let body = match listener_metrics {
            Some(at) => format!("{body}\n[metrics]\nlisten = \"{at}\"\n"),
            None => body,
        };
        fs::write(&listener_config, body).expect("write listener config");

        let mut cluster = Cluster {
            root,
            spec,
            certs,
            array,
            listener_addr,
            listener_config,
            listener: None,
            agents,
            writer: None,
            probe,
            listener_metrics,
        };
        for agent in &cluster.agents {
            cluster.wait_agent_ready(agent).await;
        }
        cluster.start_listener().await;
        cluster
    }

    pub fn root(&self) -> &Path {
        self.root.path()
    }

    pub async fn start_listener(&mut self) {
        let mut command = Command::new(bin("stillpoint-listener"));
        command.arg("--config").arg(&self.listener_config).env("RUST_LOG", "info");
        command.envs(self.spec.listener_env.iter().map(|(k, v)| (k, v)));
        if self.spec.json_logs {
            command.args(["--log-format", "json"]);
        }
        self.listener = Some(Proc::spawn(command, self.root().join("listener.log")));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut client =
                pb::listener_client::ListenerClient::new(self.channel_to_listener("operator"));
            if client.health(pb::HealthRequest {}).await.is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "listener not ready in 30s:\n{}",
                self.listener_log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILLs the listener and starts it again on the same data dir, waiting until it serves.
    pub async fn restart_listener(&mut self) {
        if let Some(listener) = self.listener.as_mut() {
            listener.kill();
        }
        self.start_listener().await;
    }

    pub fn listener_log(&self) -> String {
        self.listener.as_ref().map(Proc::log_text).unwrap_or_default()
    }

    pub fn tls(&self, identity: &str) -> TlsFiles {
        TlsFiles {
            ca: self.certs.join("ca.pem"),
            cert: self.certs.join(format!("{identity}.pem")),
            key: self.certs.join(format!("{identity}.key")),
        }
    }

    pub fn channel_to_listener(&self, identity: &str) -> tonic::transport::Channel {
        let url = format!("https://{}", self.listener_addr);
        stillpoint_core::tls::channel(
            &url,
            "listener",
            &self.tls(identity),
            Duration::from_secs(10),
        )
        .expect("channel")
    }

    pub fn channel_to_agent(&self, server: &str, identity: &str) -> tonic::transport::Channel {
        let agent = self.agent(server);
        let url = format!("https://{}", agent.addr);
        stillpoint_core::tls::channel(&url, server, &self.tls(identity), Duration::from_secs(10))
            .expect("channel")
    }

    pub fn agent_mut(&mut self, server: &str) -> &mut Agent {
        self.agents.iter_mut().find(|a| a.name == server).expect("known agent")
    }

    /// SIGKILLs an agent (not its guardian, which must notice by itself).
    pub fn kill_agent(&mut self, server: &str) {
        self.agent_mut(server).proc.kill();
    }

    /// Starts a killed agent again with the same config and waits until it serves.
    pub async fn restart_agent(&mut self, server: &str) {
        let wrapper = (self.spec.agent_wrapper)(server);
        let log = self.root().join(format!("agent-{server}.log"));
        let agent = self.agents.iter().find(|a| a.name == server).expect("known agent");
        let proc = spawn_agent(&wrapper, &agent.config, &log);
        self.agent_mut(server).proc = proc;
        let agent = self.agents.iter().find(|a| a.name == server).expect("known agent");
        self.wait_agent_ready(agent).await;
    }

    /// Appends `toml` (e.g. `[[quiescer]]` tables for applications the test started after the
    /// cluster) to a server's agent config, and restarts that agent on it.
    pub async fn add_to_agent_config(&mut self, server: &str, toml: &str) {
        use std::io::Write;
        let config = self.agent(server).config.clone();
        let mut file = fs::OpenOptions::new().append(true).open(&config).expect("agent config");
        file.write_all(format!("\n{toml}\n").as_bytes()).expect("append to agent config");
        drop(file);
        self.kill_agent(server);
        self.restart_agent(server).await;
    }

    pub fn agent(&self, server: &str) -> &Agent {
        self.agents.iter().find(|a| a.name == server).expect("known agent")
    }

    async fn wait_agent_ready(&self, agent: &Agent) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut client =
                pb::agent_client::AgentClient::new(self.channel_to_agent(&agent.name, "listener"));
            if client.status(pb::StatusRequest {}).await.is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "agent {} not ready in 30s:\n{}",
                agent.name,
                agent.proc.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Runs `backupctl` as `identity` and returns its output (blocking the test's thread is fine:
    /// the cluster runs in other processes).
    pub fn backupctl(&self, identity: &str, args: &[&str]) -> Output {
        Command::new(bin("backupctl"))
            .args(args)
            .env("STILLPOINT_LISTENER", format!("https://{}", self.listener_addr))
            .env("STILLPOINT_CERTS", &self.certs)
            .env("STILLPOINT_IDENTITY", identity)
            .env_remove("STILLPOINT_CA")
            .env_remove("STILLPOINT_CERT")
            .env_remove("STILLPOINT_KEY")
            .output()
            .expect("run backupctl")
    }

    /// `backupctl restore` as the operator of `server`'s volumes and artifacts in backup `id`
    /// into `to`, from the cluster's saveset repository.
    pub fn restore(&self, id: &str, server: &str, to: &Path) -> Output {
        let repo = self.root().join("saveset").display().to_string();
        let pass = self.root().join("saveset.pass").display().to_string();
        let to = to.display().to_string();
        let args = [
            "restore",
            id,
            "--server",
            server,
            "--to",
            &to,
            "--repo",
            &repo,
            "--passphrase-file",
            &pass,
        ];
        self.backupctl("operator", &args)
    }

    /// `backupctl ... --json` as the operator; returns the exit code and the parsed JSON.
    pub fn backupctl_json(&self, args: &[&str]) -> (i32, Value) {
        let mut all = args.to_vec();
        all.push("--json");
        let out = self.backupctl("operator", &all);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let json = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
            panic!(
                "backupctl {args:?} printed no JSON ({e}):\nstdout: {stdout}\nstderr: {}\nlistener log:\n{}",
                String::from_utf8_lossy(&out.stderr),
                self.listener_log()
            )
        });
        (out.status.code().unwrap_or(-1), json)
    }

    /// Starts the causal writer over every server's `data` LUN.
    pub fn start_writer(&mut self) {
        let mut command = Command::new(bin("causal-writer"));
        command.arg("run").arg(self.root().join("control"));
        for server in &self.spec.servers {
            command.arg(self.array.lun_path(server, "data").expect("lun path"));
        }
        self.writer = Some(Proc::spawn(command, self.root().join("writer.log")));
    }

    pub fn copies_of(&self, backup: &str) -> PathBuf {
        self.root().join("copies").join(backup)
    }

    /// The saveset repository of a `Copy::Saveset` cluster, unlocked.
    pub fn saveset(&self) -> stillpoint_saveset::Repository {
        let secret = stillpoint_saveset::Secret::passphrase(SAVESET_PASSPHRASE);
        stillpoint_saveset::Repository::open(&self.root().join("saveset"), &secret)
            .expect("open saveset repository")
    }

    /// Bytes in the saveset repository's packs: what every backup so far stored.
    pub fn saveset_stored_bytes(&self) -> u64 {
        let packs = self.root().join("saveset").join("packs");
        let mut total = 0;
        for dir in fs::read_dir(&packs).expect("read packs") {
            for pack in fs::read_dir(dir.expect("packs entry").path()).expect("read pack dir") {
                total += pack.expect("pack entry").metadata().expect("pack metadata").len();
            }
        }
        total
    }

    /// Restores every volume of `backup` from the saveset into `to` as
    /// `<server>-<volume>.img`, found through the backup's manifest; returns the files.
    pub fn restore_from_saveset(&self, backup: &str, to: &Path) -> Vec<PathBuf> {
        use stillpoint_saveset::Manifest;
        let repo = self.saveset();
        let manifest = repo
            .list_manifests()
            .expect("list manifests")
            .into_iter()
            .find_map(|id| match repo.load_manifest(id).expect("load manifest") {
                Manifest::Backup(m) if m.backup == backup => Some(m),
                _ => None,
            })
            .unwrap_or_else(|| panic!("no backup manifest for {backup} in the saveset"));
        fs::create_dir_all(to).expect("restore dir");
        manifest
            .volumes
            .iter()
            .map(|&id| {
                let Manifest::Volume(v) = repo.load_manifest(id).expect("load volume manifest")
                else {
                    panic!("backup {backup}: manifest {id} is not a volume manifest")
                };
                assert_eq!(v.meta.backup, backup, "volume manifest {id} of another backup");
                let target = to.join(format!("{}-{}.img", v.meta.server, v.meta.volume));
                repo.restore_volume(id, &target, false).expect("restore volume");
                target
            })
            .collect()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Stop the writer first so it is not left waiting on a pause.
        self.writer.take();
        self.listener.take();
        self.agents.clear();
        self.probe.take();
        // Before the temp dir goes, so it can remove the mount point too.
        if let Some(mount) = self.array.image() {
            mount.unmount_for_cleanup();
        }
    }
}

pub fn spawn_agent(wrapper: &[String], config: &Path, log: &Path) -> Proc {
    let mut command = match wrapper.split_first() {
        Some((program, args)) => {
            let mut c = Command::new(program);
            c.args(args).arg(bin("stillpoint-agent"));
            c
        }
        None => Command::new(bin("stillpoint-agent")),
    };
    command.arg("--config").arg(config).env("RUST_LOG", "info");
    Proc::spawn(command, log.to_path_buf())
}

fn tls_toml(certs: &Path, name: &str) -> String {
    format!(
        "ca = {:?}\ncert = {:?}\nkey = {:?}\n",
        certs.join("ca.pem").display().to_string(),
        certs.join(format!("{name}.pem")).display().to_string(),
        certs.join(format!("{name}.key")).display().to_string()
    )
}

/// Polls `check` every 50 ms until it returns `Some` or `timeout` passes.
pub async fn wait_for<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `len` bytes (a multiple of 8) that do not compress and differ by seed (xorshift64): disk
/// content the saveset stores as it is.
pub fn incompressible(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed | 1;
    (0..len / 8)
        .flat_map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state.to_le_bytes()
        })
        .collect()
}
