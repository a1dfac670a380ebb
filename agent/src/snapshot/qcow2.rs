//! The qcow2 provider: internal snapshots (`qemu-img snapshot -c/-d`, tag
//! `stillpoint-<backup_id>`) of qcow2 disk files that no VM has open for writing, from the
//! snapshot to the cleanup. qemu-img takes the image's lock, so a disk a running qemu holds is
//! refused, never corrupted. The locator is `<disk path>@<tag>`: a copy on the agent reads it
//! through [`Export`], the snapshot exported read-only as a raw file for the copy's duration.
//! With change tracking the copy keeps a base per group inside each disk, a second internal
//! snapshot `stillpoint.base.<group>` ([`keep_base`]), and asks [`changes_since_base`] which
//! guest bytes differ between it and a new snapshot (`map.rs` reads the image's tables).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use serde::Deserialize;
use stillpoint_core::validate_name;
use stillpoint_proto::Snapshot;

use super::{basename, SnapshotProvider};

pub mod map;

const KIND: &str = "qcow2";
const TAG_PREFIX: &str = "stillpoint-";

/// `[snapshot] provider = "qcow2"`: the volumes are the disk files; nothing else to set.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Qcow2Config {}

impl Qcow2Config {
    /// Problems with the disks, one line each naming the field. Reads each image's header with
    /// `qemu-img info -U` (shared, so a running VM does not fail the check); changes nothing.
    pub fn problems(&self, volumes: &[String], out: &mut Vec<String>) {
        let mut names = std::collections::HashSet::new();
        for (i, v) in volumes.iter().enumerate() {
            let path = Path::new(v);
            if !path.is_absolute() || !path.is_file() {
                out.push(format!(
                    "volumes[{i}]: {v} is not an existing absolute path to a qcow2 disk file"
                ));
                continue;
            }
            match basename(v) {
                Err(e) => out.push(format!("volumes[{i}]: {e:#}")),
                Ok(base) if !names.insert(base.to_string()) => out.push(format!(
                    "volumes[{i}]: another volume is also named {base}; snapshots are named by basename"
                )),
                Ok(_) => {}
            }
            if let Err(e) = info(v) {
                out.push(format!("volumes[{i}]: {e:#}"));
            }
        }
    }
}

fn tag(backup_id: &str) -> String {
    format!("{TAG_PREFIX}{backup_id}")
}

/// Bases are named `stillpoint.base.<group>`: not `stillpoint-`, so `list` never takes one for
/// a backup's snapshot and `delete` never removes one.
const BASE_PREFIX: &str = "stillpoint.base.";

/// The tag of `group`'s base snapshot in each disk; the group must be a valid name (empty: a
/// listener that names no group, one base per disk).
pub fn base_tag(group: &str) -> anyhow::Result<String> {
    if group.is_empty() {
        return Ok(BASE_PREFIX.trim_end_matches('.').to_string());
    }
    validate_name("group", group)?;
    Ok(format!("{BASE_PREFIX}{group}"))
}

/// Which guest bytes of snapshot `tag` of `disk` may differ from `group`'s base snapshot, which
/// must still have the `identity` recorded when it was kept. `Err("none: why")` when the base
/// cannot be trusted (gone, made again, unreadable): back up without it. `Ok(Unknown)` when the
/// two snapshots cannot be compared soundly (`map.rs` says why). Read while the copy's export
/// holds the disk's lock, so no writer changes the tables under it.
pub fn changes_since_base(
    disk: &str,
    group: &str,
    identity: &str,
    tag: &str,
) -> Result<stillpoint_saveset::ChangeMap, String> {
    use stillpoint_saveset::{ChangeMap, MapSource};
    let base = base_tag(group).map_err(|e| format!("none: {e:#}"))?;
    let file = std::fs::File::open(disk).map_err(|e| format!("none: open {disk}: {e}"))?;
    let image = match map::Image::open(&file) {
        Ok(image) => image,
        Err(why) => return Ok(ChangeMap::Unknown(format!("{disk}: {why}"))),
    };
    let kept =
        image.snapshot(&base).map_err(|why| format!("none: base snapshot in {disk}: {why}"))?;
    let now = kept.identity();
    if now != identity {
        return Err(format!(
            "none: base snapshot {base} in {disk} is not the one kept (kept {identity}; now {now})"
        ));
    }
    let new = match image.snapshot(tag) {
        Ok(s) => s,
        Err(why) => return Ok(ChangeMap::Unknown(format!("{disk}: {why}"))),
    };
    Ok(match image.changes(kept, new) {
        Ok(ranges) => {
            stillpoint_saveset::failpoint(ChangeMap::Ranges { source: MapSource::Qcow2, ranges })
        }
        Err(why) => ChangeMap::Unknown(format!("{disk}: {why}")),
    })
}

/// Whether change maps can be made of `disk` at all: `Err(why)` for an image `map.rs` refuses
/// (a backing file, encryption, an external data file, subclusters, a dirty or corrupt image).
pub fn mappable(disk: &str) -> Result<(), String> {
    let file = std::fs::File::open(disk).map_err(|e| format!("open {disk}: {e}"))?;
    map::Image::open(&file).map(drop).map_err(|why| format!("{disk}: {why}"))
}

/// Makes `group`'s base in `disk` hold what snapshot `tag` holds, and returns its identity:
/// deletes the old base, snapshots the disk's current state as the new base, and checks that it
/// maps every guest cluster as `tag` does (nothing may write the disk between a backup's
/// snapshot and its cleanup; if something did, the new base is deleted and the error says so).
/// Run once the copy's export let go of the disk: a snapshot needs its write lock.
pub fn keep_base(disk: &str, group: &str, tag: &str) -> anyhow::Result<String> {
    let base = base_tag(group)?;
    let info = info(disk)?;
    for _ in info.snapshots.iter().filter(|s| s.name == base) {
        qemu_img(&["snapshot", "--image-opts", "-d", &base, &image_opts(disk)])
            .with_context(|| format!("delete the old base {base} of {disk}"))?;
    }
    // An image no map can be made of (a backing file, encryption...) gets no base at all.
    mappable(disk).map_err(|why| anyhow!("no change map can be made: {why}"))?;
    qemu_img(&["snapshot", "--image-opts", "-c", &base, &image_opts(disk)])
        .with_context(|| format!("snapshot {disk} as the base {base}"))?;
    let checked = (|| {
        let file = std::fs::File::open(disk).with_context(|| format!("open {disk}"))?;
        let image = map::Image::open(&file).map_err(|why| anyhow!("{disk}: {why}"))?;
        let kept = image.snapshot(&base).map_err(|why| anyhow!("{disk}: {why}"))?;
        let backed_up = image.snapshot(tag).map_err(|why| anyhow!("{disk}: {why}"))?;
        let differ = image.changes(backed_up, kept).map_err(|why| anyhow!("{disk}: {why}"))?;
        if !differ.is_empty() {
            let bytes: u64 = differ.iter().map(|r| r.end - r.start).sum();
            return Err(anyhow!(
                "{disk} changed since snapshot {tag} ({} ranges, {bytes} bytes differ): something wrote the disk between the backup's snapshot and its cleanup",
                differ.len()
            ));
        }
        Ok(kept.identity())
    })();
    if checked.is_err() {
        let _ = qemu_img(&["snapshot", "--image-opts", "-d", &base, &image_opts(disk)]);
    }
    checked
}

/// What `qemu-img info --output=json` says that we use.
#[derive(Debug, Deserialize)]
struct Info {
    format: String,
    #[serde(rename = "virtual-size")]
    virtual_size: u64,
    #[serde(default)]
    snapshots: Vec<SnapshotInfo>,
}

#[derive(Debug, Deserialize)]
struct SnapshotInfo {
    name: String,
}

/// Runs `qemu-img <args>`: stdout, or an error with stderr and what it means.
fn qemu_img(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("qemu-img")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("run qemu-img (is qemu-utils installed?)")?;
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    if stderr.contains("\"write\" lock") {
        return Err(anyhow!(
            "qemu-img {}: another process has the disk open (a running VM?), so qemu-img could not get its write lock ({stderr}); the qcow2 provider only snapshots disks no VM has open for writing: shut the VM down in a quiescer, or snapshot it through the hypervisor",
            args.join(" ")
        ));
    }
    Err(anyhow!("qemu-img {} failed with {}: {stderr}", args.join(" "), out.status))
}

/// `disk` as qcow2 for `--image-opts` (`qemu-img snapshot` has no `-f`, and probing the format
/// of a file is what `-f` avoids).
fn image_opts(disk: &str) -> String {
    format!("driver=qcow2,file.driver=file,file.filename={}", disk.replace(',', ",,"))
}

/// The image's header, read with a shared lock (`-U`), so it works while a VM runs.
fn info(disk: &str) -> anyhow::Result<Info> {
    let text = qemu_img(&["info", "-U", "-f", "qcow2", "--output=json", disk])?;
    let info: Info =
        serde_json::from_str(&text).with_context(|| format!("parse qemu-img info of {disk}"))?;
    if info.format != "qcow2" {
        return Err(anyhow!("{disk} is a {} image, not qcow2", info.format));
    }
    Ok(info)
}

/// Takes internal snapshots of the configured qcow2 disks.
pub struct Qcow2 {
    disks: Vec<String>,
}

impl Qcow2 {
    /// `disks` are the configured volumes: `list` and `delete` look inside them.
    pub fn new(_config: &Qcow2Config, disks: &[String]) -> Qcow2 {
        Qcow2 { disks: disks.to_vec() }
    }
}

fn snapshot_of(disk: &str, tag: &str, size: u64) -> anyhow::Result<Snapshot> {
    Ok(Snapshot {
        volume: basename(disk)?.to_string(),
        provider: KIND.into(),
        locator: format!("{disk}@{tag}"),
        size_bytes: size,
    })
}

impl SnapshotProvider for Qcow2 {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn create(&self, backup_id: &str, volumes: &[String]) -> anyhow::Result<Vec<Snapshot>> {
        validate_name("backup id", backup_id)?;
        let tag = tag(backup_id);
        volumes
            .iter()
            .map(|disk| {
                let info = info(disk).with_context(|| format!("snapshot {disk}"))?;
                // qemu-img makes a second snapshot of the same name without complaint.
                if !info.snapshots.iter().any(|s| s.name == tag) {
                    qemu_img(&["snapshot", "--image-opts", "-c", &tag, &image_opts(disk)])
                        .with_context(|| format!("snapshot {disk}"))?;
                }
                snapshot_of(disk, &tag, info.virtual_size)
            })
            .collect()
    }

    fn delete(&self, backup_id: &str) -> anyhow::Result<u32> {
        validate_name("backup id", backup_id)?;
        let tag = tag(backup_id);
        reap_stale_exports();
        let mut deleted = 0;
        for disk in &self.disks {
            if !Path::new(disk).exists() {
                continue; // a disk that is gone holds no snapshot
            }
            let info = info(disk)?;
            for _ in info.snapshots.iter().filter(|s| s.name == tag) {
                qemu_img(&["snapshot", "--image-opts", "-d", &tag, &image_opts(disk)])
                    .with_context(|| format!("delete snapshot {tag} of {disk}"))?;
                deleted += 1;
            }
        }
        Ok(deleted)
    }

    fn list(&self) -> anyhow::Result<Vec<(String, Snapshot)>> {
        let mut out = Vec::new();
        for disk in &self.disks {
            if !Path::new(disk).exists() {
                continue;
            }
            let info = info(disk)?;
            for s in &info.snapshots {
                let Some(id) = s.name.strip_prefix(TAG_PREFIX) else { continue };
                if validate_name("backup id", id).is_ok() {
                    out.push((id.to_string(), snapshot_of(disk, &s.name, info.virtual_size)?));
                }
            }
        }
        Ok(out)
    }
}

/// A qcow2 snapshot exported read-only as a raw file while a copy reads it: `qemu-nbd` loads
/// the internal snapshot (`--load-snapshot`, read-only) on a unix socket, and
/// `qemu-storage-daemon` exports that as a FUSE file. Both hold the image's shared lock, so a
/// VM cannot open the disk for writing until the export ends. Dropping it unmounts and stops
/// both, and waits until they let go of the disk (a delete right after needs its lock).
pub struct Export {
    /// The raw file the copy reads.
    pub file: PathBuf,
    /// The disk and the snapshot's tag it exports.
    pub disk: String,
    pub tag: String,
    dir: PathBuf,
    /// The daemons' pids, the FUSE export's first: stopped in this order.
    pids: Vec<u32>,
}

static EXPORTS: AtomicU64 = AtomicU64::new(0);

/// How long a daemon may take to stop.
const STOP_WITHIN: Duration = Duration::from_secs(10);

impl Export {
    /// Exports snapshot `tag` of `disk` under a fresh temporary directory. Each daemon forks
    /// into the background only once it serves (`--fork`, `--daemonize`), so its exit status
    /// says whether it could.
    pub fn start(disk: &str, tag: &str) -> anyhow::Result<Export> {
        reap_stale_exports();
        let n = EXPORTS.fetch_add(1, Ordering::SeqCst);
        let dir =
            std::env::temp_dir().join(format!("{EXPORT_DIR_PREFIX}{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        let file = dir.join(format!("{}.raw", basename(disk)?));
        let mut export =
            Export { file, disk: disk.to_string(), tag: tag.to_string(), dir, pids: Vec::new() };
        std::fs::File::create(&export.file)
            .with_context(|| format!("create {}", export.file.display()))?;
        let (socket, nbd_pid, fuse_pid) =
            (export.dir.join("nbd.sock"), export.dir.join("nbd.pid"), export.dir.join("fuse.pid"));
        let mut nbd = Command::new("qemu-nbd");
        nbd.args(["--read-only", "--format=qcow2", "--fork"])
            .arg(format!("--load-snapshot=snapshot.name={tag}"))
            .arg(format!("--socket={}", socket.display()))
            .arg(format!("--pid-file={}", nbd_pid.display()))
            .arg(disk);
        daemon(&mut nbd, "qemu-nbd", "qemu-utils")
            .with_context(|| format!("export snapshot {tag} of {disk}"))?;
        export.pids.push(read_pid(&nbd_pid)?);
        let escape = |p: &Path| p.display().to_string().replace(',', ",,");
        let mut fuse = Command::new("qemu-storage-daemon");
        fuse.arg("--blockdev")
            .arg(format!(
                "driver=nbd,node-name=snap,server.type=unix,server.path={},read-only=on",
                escape(&socket)
            ))
            .arg("--export")
            .arg(format!(
                "type=fuse,id=raw,node-name=snap,mountpoint={},writable=off",
                escape(&export.file)
            ))
            .arg("--daemonize")
            .arg(format!("--pidfile={}", fuse_pid.display()));
        daemon(&mut fuse, "qemu-storage-daemon", "qemu-system-common").with_context(|| {
            format!("export snapshot {tag} of {disk} as {}", export.file.display())
        })?;
        export.pids.insert(0, read_pid(&fuse_pid)?);
        Ok(export)
    }
}

/// Runs a daemon's foreground half; an error with its stderr, and what a lock error means.
fn daemon(command: &mut Command, what: &str, package: &str) -> anyhow::Result<()> {
    let out = command
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("run {what} (is {package} installed?)"))?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    if stderr.contains("\"write\" lock") {
        return Err(anyhow!(
            "{what} failed with {}: {stderr}: another process (a running VM?) has the disk open for writing; a qcow2 snapshot can be read only while no VM has its disk open",
            out.status
        ));
    }
    Err(anyhow!("{what} failed with {}: {stderr}", out.status))
}

fn read_pid(path: &Path) -> anyhow::Result<u32> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    text.trim().parse().with_context(|| format!("{}: {text:?} is no pid", path.display()))
}

impl Drop for Export {
    fn drop(&mut self) {
        stop(&self.file, &self.dir, std::mem::take(&mut self.pids));
    }
}

/// Unmounts `file`, stops the daemons `pids` in order (waiting until each is gone, so the disk's
/// lock is free), removes `dir`.
fn stop(file: &Path, dir: &Path, pids: Vec<u32>) {
    let _ = Command::new("umount").arg(file).stderr(Stdio::null()).status();
    for pid in pids {
        let alive = || running(pid);
        // Waits up to STOP_WITHIN for it to go: the disk's lock is free only once it is gone.
        let gone = || {
            let deadline = Instant::now() + STOP_WITHIN;
            while alive() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            !alive()
        };
        let signal = |sig: &str| {
            let _ =
                Command::new("kill").args([sig, &pid.to_string()]).stderr(Stdio::null()).status();
        };
        // It may be gone already: qemu-nbd ends when its one client does.
        signal("-TERM");
        if gone() {
            continue;
        }
        signal("-KILL");
        if gone() {
            tracing::warn!(pid, "a qcow2 export's daemon did not stop on SIGTERM; killed it");
        } else {
            tracing::warn!(pid, "a qcow2 export's daemon survived SIGTERM and SIGKILL; it may still hold the disk's lock");
        }
    }
    let _ = Command::new("umount").arg("-l").arg(file).stderr(Stdio::null()).status();
    let _ = std::fs::remove_dir_all(dir);
}

/// Whether `pid` still runs. A zombie does not: it closed its files (so the disk's lock is
/// free) and only waits to be reaped, which a daemon's parent (init, or a container's) may do
/// late; waiting for it to vanish cost each copy over a second where init reaps slowly.
fn running(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
    // `pid (comm) S ...`: the state follows the last `)` (a command may hold one).
    let state = stat.rsplit_once(')').and_then(|(_, rest)| rest.trim_start().chars().next());
    !matches!(state, Some('Z' | 'X'))
}

const EXPORT_DIR_PREFIX: &str = "stillpoint-qcow2-export-";

/// Ends the exports an agent process that is gone left behind (killed during a copy): their
/// daemons would hold the disks' locks, and the snapshots' deletes would fail. A daemon is
/// stopped only if its command line names that export's directory.
pub fn reap_stale_exports() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else { return };
    for entry in entries.flatten() {
        let dir = entry.path();
        let Some(name) = dir.file_name().and_then(|n| n.to_str()) else { continue };
        let Some(rest) = name.strip_prefix(EXPORT_DIR_PREFIX) else { continue };
        let Some(owner) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if Path::new(&format!("/proc/{owner}")).exists() {
            continue; // its agent still runs, and ends it
        }
        let dir_text = dir.display().to_string();
        let pids: Vec<u32> = ["fuse.pid", "nbd.pid"]
            .iter()
            .filter_map(|f| read_pid(&dir.join(f)).ok())
            .filter(|pid| {
                std::fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&dir_text))
            })
            .collect();
        let files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "raw"))
            .collect();
        tracing::warn!(dir = %dir.display(), owner, daemons = pids.len(), "ending a qcow2 export left by an agent process that is gone");
        for file in &files {
            let _ = Command::new("umount").arg(file).stderr(Stdio::null()).status();
        }
        let file = files.first().cloned().unwrap_or_else(|| dir.join("none.raw"));
        stop(&file, &dir, pids);
    }
}

/// Replaces each qcow2 snapshot's locator by the raw file of its export; the exports must
/// outlive the copy's reads. Other providers' snapshots pass unchanged.
pub fn export_for_copy(snapshots: Vec<Snapshot>) -> anyhow::Result<(Vec<Snapshot>, Vec<Export>)> {
    let mut exports = Vec::new();
    let mut out = Vec::with_capacity(snapshots.len());
    for mut snap in snapshots {
        if snap.provider == KIND {
            let (disk, tag) = snap
                .locator
                .rsplit_once('@')
                .ok_or_else(|| anyhow!("qcow2 locator {:?} is not <disk>@<tag>", snap.locator))?;
            let export = Export::start(disk, tag)?;
            snap.locator = export.file.display().to_string();
            exports.push(export);
        }
        out.push(snap);
    }
    Ok((out, exports))
}
