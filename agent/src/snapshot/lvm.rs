//! The LVM provider: a read-only snapshot LV per volume (`vg/lv`), thick (`lvcreate -s -L`, its
//! copy-on-write space taken from the volume group) or thin (`lvcreate -s` in the origin's pool),
//! the kind read from `lvs`. Each snapshot carries the tag `stillpoint-backup:<id>`, so `list`
//! and `delete` find them after a restart; the locator is its device, `/dev/<vg>/<name>`.
//! Everything goes through the `lvm` binary (JSON reports, never column positions), each call
//! under a timeout, never through a shell. It does not freeze anything: quiescers do. Change
//! maps of thin LVs for the agent's copy (a kept base, `thin_delta`) are in `thin.rs` and
//! `delta.rs`.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use serde::Deserialize;
use stillpoint_proto::Snapshot;

use super::SnapshotProvider;

pub mod delta;
pub mod thin;

/// The provider's name in a snapshot's `provider`.
pub const KIND: &str = "lvm";

/// The tag naming a snapshot's backup: `stillpoint-backup:<backup id>` (tags allow `:`).
pub const TAG_PREFIX: &str = "stillpoint-backup:";

/// The `lvs` fields every report asks for, by name (the JSON keys are the same).
const LV_FIELDS: &str =
    "lv_name,vg_name,lv_attr,lv_size,segtype,pool_lv,origin,lv_tags,data_percent,metadata_percent";
const VG_FIELDS: &str = "vg_name,vg_free,vg_extent_size";

/// Kept from a failing command's stderr: LVM says what was wrong in its last lines.
const STDERR_TAIL: usize = 2048;

fn default_thin_pool_max_percent() -> f64 {
    80.0
}

fn default_command_timeout_ms() -> u64 {
    30_000
}

/// `[snapshot] provider = "lvm"`: how big a thick snapshot is, how full a thin pool may be.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LvmConfig {
    /// Copy-on-write space of each thick snapshot: a percentage of its origin (`"20%"`) or a
    /// size (`"2GiB"`, `"512MiB"`; K, M, G, T are binary, as in `lvcreate -L`). Unused for
    /// thin volumes, whose snapshots share their pool.
    pub snapshot_size: String,
    /// A thin volume's snapshot is refused before freezing when its pool's data or metadata
    /// is fuller than this percentage: a full pool stops every write to it.
    #[serde(default = "default_thin_pool_max_percent")]
    pub thin_pool_max_percent: f64,
    /// Each `lvm` command is killed after this long and the operation fails with its stderr.
    #[serde(default = "default_command_timeout_ms")]
    pub command_timeout_ms: u64,
}

impl LvmConfig {
    /// Field problems, one line each, without running anything (`volumes` are the config's).
    pub fn problems(&self, volumes: &[String], out: &mut Vec<String>) {
        if let Err(e) = SnapshotSize::parse(&self.snapshot_size) {
            out.push(format!("snapshot.snapshot_size: {e}"));
        }
        if !(self.thin_pool_max_percent > 0.0 && self.thin_pool_max_percent <= 100.0) {
            out.push(format!(
                "snapshot.thin_pool_max_percent: {} is not a percentage above 0 and at most 100",
                self.thin_pool_max_percent
            ));
        }
        if self.command_timeout_ms == 0 {
            out.push("snapshot.command_timeout_ms: must be above 0".into());
        }
        let mut seen = BTreeSet::new();
        for (i, v) in volumes.iter().enumerate() {
            match Volume::parse(v) {
                Err(e) => out.push(format!("volumes[{i}]: {e}")),
                Ok(vol) if !seen.insert(vol.clone()) => {
                    out.push(format!("volumes[{i}]: {v} appears twice"))
                }
                Ok(_) => {}
            }
        }
    }
}

/// A thick snapshot's size, as configured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SnapshotSize {
    /// Of the origin's size.
    Percent(f64),
    Bytes(u64),
}

impl SnapshotSize {
    pub fn parse(text: &str) -> anyhow::Result<SnapshotSize> {
        let t = text.trim();
        let bad = || {
            anyhow!("{text:?} is neither a percentage of the origin like \"20%\" nor a size like \"2GiB\"")
        };
        if let Some(p) = t.strip_suffix('%') {
            let p: f64 = p.trim().parse().map_err(|_| bad())?;
            if !(p > 0.0 && p <= 100.0) {
                bail!("{text:?}: a percentage above 0 and at most 100");
            }
            return Ok(SnapshotSize::Percent(p));
        }
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (digits, unit) = t.split_at(split);
        let n: u64 = digits.parse().map_err(|_| bad())?;
        let shift = match unit.trim() {
            "" | "B" | "b" => 0,
            "K" | "k" | "KiB" => 10,
            "M" | "m" | "MiB" => 20,
            "G" | "g" | "GiB" => 30,
            "T" | "t" | "TiB" => 40,
            _ => return Err(bad()),
        };
        let bytes = n.checked_mul(1 << shift).ok_or_else(|| anyhow!("{text:?} is too large"))?;
        if bytes == 0 {
            bail!("{text:?}: a snapshot needs some space");
        }
        Ok(SnapshotSize::Bytes(bytes))
    }

    /// The bytes to ask for: this size of an `origin` of that many bytes, at most what a
    /// snapshot of it can ever use, rounded up to whole extents (what `lvcreate` allocates,
    /// so the budget counts what it will take).
    pub fn bytes_for(self, origin: u64, extent: u64) -> u64 {
        let raw = match self {
            SnapshotSize::Percent(p) => ((origin as f64) * p / 100.0).ceil() as u64,
            SnapshotSize::Bytes(b) => b,
        };
        // lvcreate reduces a larger request to this itself ("maximum usable size"): the origin
        // in 4 KiB chunks, a 16-byte exception per chunk and two chunks of header.
        let chunks = origin.div_ceil(4096);
        let max = origin + (chunks * 16).div_ceil(4096) * 4096 + 2 * 4096;
        let extent = extent.max(512);
        raw.clamp(1, max).div_ceil(extent).saturating_mul(extent)
    }
}

/// One configured volume, `vg/lv`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Volume {
    pub vg: String,
    pub lv: String,
}

/// LVM's own name rule: `[a-zA-Z0-9+_.-]`, not starting with a hyphen, not `.` or `..`.
fn lvm_name_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 127
        && !name.starts_with('-')
        && name != "."
        && name != ".."
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'_' | b'.' | b'-'))
}

impl Volume {
    pub fn parse(text: &str) -> anyhow::Result<Volume> {
        let shown = stillpoint_core::text::clip(text, 64);
        let Some((vg, lv)) = text.split_once('/') else {
            bail!("{shown} is not a logical volume like vg0/data (volume group/logical volume)");
        };
        if !lvm_name_ok(vg) || !lvm_name_ok(lv) {
            bail!("{shown}: LVM names are [a-zA-Z0-9+_.-], not starting with '-'; give vg/lv");
        }
        Ok(Volume { vg: vg.into(), lv: lv.into() })
    }

    fn full(&self) -> String {
        format!("{}/{}", self.vg, self.lv)
    }
}

impl std::fmt::Display for Volume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.vg, self.lv)
    }
}

/// The snapshot LV's name for `origin` in `backup_id`: `<lv>.sp.<id>` with the id's `:` (which
/// LV names do not allow) as `+` (which backup ids do not use), so names stay distinct. The tag
/// holds the id itself; the name only has to be unique and recognisable.
pub fn snapshot_name(origin: &str, backup_id: &str) -> anyhow::Result<String> {
    stillpoint_core::validate_name("backup id", &backup_id.replace(':', "_"))?;
    let name = format!("{origin}.sp.{}", backup_id.replace(':', "+"));
    // dm names are `<vg>-<lv>` within 127 bytes; leave room for the volume group.
    if name.len() > 100 {
        bail!(
            "snapshot name {name} would be {} characters; LVM allows about 100 here: shorten the origin LV's name",
            name.len()
        );
    }
    Ok(name)
}

/// `lvs --reportformat json`: `{"report": [{"lv": [{...}]}]}`, every value a string.
#[derive(Debug, Deserialize)]
struct Report<T> {
    report: Vec<T>,
}

#[derive(Debug, Deserialize)]
struct LvSection {
    #[serde(default)]
    lv: Vec<LvRow>,
}

#[derive(Debug, Deserialize)]
struct VgSection {
    #[serde(default)]
    vg: Vec<VgRow>,
}

/// One LV as `lvs -o LV_FIELDS --units b --nosuffix` reports it.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct LvRow {
    pub lv_name: String,
    pub vg_name: String,
    pub lv_attr: String,
    pub lv_size: String,
    pub segtype: String,
    #[serde(default)]
    pub pool_lv: String,
    #[serde(default)]
    pub origin: String,
    #[serde(default)]
    pub lv_tags: String,
    #[serde(default)]
    pub data_percent: String,
    #[serde(default)]
    pub metadata_percent: String,
}

/// One VG as `vgs -o VG_FIELDS --units b --nosuffix` reports it.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct VgRow {
    pub vg_name: String,
    pub vg_free: String,
    pub vg_extent_size: String,
}

fn bytes(field: &str, value: &str) -> anyhow::Result<u64> {
    value.trim().parse().map_err(|_| anyhow!("lvs reported {field} {value:?}, not a byte count"))
}

fn percent(value: &str) -> Option<f64> {
    value.trim().parse().ok()
}

impl LvRow {
    fn size(&self) -> anyhow::Result<u64> {
        bytes("lv_size", &self.lv_size)
    }

    fn tags(&self) -> impl Iterator<Item = &str> {
        self.lv_tags.split(',').map(str::trim).filter(|t| !t.is_empty())
    }

    /// The backup id this LV is a snapshot of, from its tag.
    pub fn backup(&self) -> Option<&str> {
        self.tags().find_map(|t| t.strip_prefix(TAG_PREFIX))
    }

    fn is_thin(&self) -> bool {
        self.segtype == "thin"
    }

    /// `lv_attr`'s fifth character is the state: `a` when active (its device exists).
    fn is_active(&self) -> bool {
        self.lv_attr.as_bytes().get(4) == Some(&b'a')
    }
}

/// Parses `lvs --reportformat json` output.
pub fn parse_lvs(json: &str) -> anyhow::Result<Vec<LvRow>> {
    let report: Report<LvSection> =
        serde_json::from_str(json).context("parse lvs --reportformat json output")?;
    Ok(report.report.into_iter().flat_map(|s| s.lv).collect())
}

/// Parses `vgs --reportformat json` output.
pub fn parse_vgs(json: &str) -> anyhow::Result<Vec<VgRow>> {
    let report: Report<VgSection> =
        serde_json::from_str(json).context("parse vgs --reportformat json output")?;
    Ok(report.report.into_iter().flat_map(|s| s.vg).collect())
}

/// `lvs` over every LV of `vgs` (snapshots and pools included).
pub fn lvs_args(vgs: &[String]) -> Vec<String> {
    let mut args: Vec<String> =
        ["lvs", "--reportformat", "json", "--units", "b", "--nosuffix"].map(String::from).into();
    args.extend(["-o".into(), LV_FIELDS.into()]);
    args.extend(vgs.iter().cloned());
    args
}

pub fn vgs_args(vgs: &[String]) -> Vec<String> {
    let mut args: Vec<String> =
        ["vgs", "--reportformat", "json", "--units", "b", "--nosuffix"].map(String::from).into();
    args.extend(["-o".into(), VG_FIELDS.into()]);
    args.extend(vgs.iter().cloned());
    args
}

/// How one volume's snapshot is taken.
#[derive(Debug, Clone, PartialEq)]
pub enum Plan {
    /// Copy-on-write space of `cow_bytes` from the volume group.
    Thick { cow_bytes: u64 },
    /// In the origin's thin pool, which must stay below its limit.
    Thin { pool: String },
}

/// `lvcreate` for one snapshot: read-only, tagged with its backup, and for a thin one set to be
/// activated (thin snapshots skip activation by default, and the copy reads the device).
pub fn lvcreate_args(volume: &Volume, name: &str, backup_id: &str, plan: &Plan) -> Vec<String> {
    let mut args: Vec<String> = vec!["lvcreate".into(), "--snapshot".into()];
    match plan {
        Plan::Thick { cow_bytes } => args.extend(["--size".into(), format!("{cow_bytes}b")]),
        Plan::Thin { .. } => args.extend(["--setactivationskip".into(), "n".into()]),
    }
    args.extend([
        "--permission".into(),
        "r".into(),
        "--name".into(),
        name.into(),
        "--addtag".into(),
        format!("{TAG_PREFIX}{backup_id}"),
        volume.full(),
    ]);
    args
}

/// What `lvm` knows of the volume groups this provider works in.
struct State {
    lvs: Vec<LvRow>,
    vgs: BTreeMap<String, VgRow>,
}

impl State {
    fn lv(&self, vg: &str, lv: &str) -> Option<&LvRow> {
        self.lvs.iter().find(|r| r.vg_name == vg && r.lv_name == lv)
    }

    fn extent(&self, vg: &str) -> anyhow::Result<u64> {
        let row = self.vgs.get(vg).ok_or_else(|| anyhow!("volume group {vg} not found"))?;
        bytes("vg_extent_size", &row.vg_extent_size)
    }

    /// How `volume`'s snapshot would be taken, or why it cannot be.
    fn plan(&self, volume: &Volume, size: SnapshotSize) -> anyhow::Result<Plan> {
        let row = self.lv(&volume.vg, &volume.lv).ok_or_else(|| {
            anyhow!("{volume}: no such logical volume (see lvs {}); fix volumes", volume.vg)
        })?;
        if !row.origin.is_empty() || row.segtype == "snapshot" {
            bail!("{volume} is itself a snapshot (of {}); snapshot its origin", row.origin);
        }
        if row.is_thin() {
            if row.pool_lv.is_empty() {
                bail!("{volume}: a thin volume without a pool");
            }
            return Ok(Plan::Thin { pool: row.pool_lv.clone() });
        }
        if row.segtype == "thin-pool" {
            bail!("{volume} is a thin pool, not a volume; snapshot its thin volumes");
        }
        let cow_bytes = size.bytes_for(row.size()?, self.extent(&volume.vg)?);
        Ok(Plan::Thick { cow_bytes })
    }

    /// The budget: every thick snapshot fits in its volume group's free space and every thin
    /// one's pool is below `max_percent`. Ok: a one-line summary; Err: every shortfall.
    fn budget(&self, volumes: &[Volume], cfg: &Settings) -> anyhow::Result<String> {
        let mut thick: BTreeMap<&str, Vec<(String, u64)>> = BTreeMap::new();
        let mut pools: BTreeSet<(String, String)> = BTreeSet::new();
        let mut problems = Vec::new();
        for v in volumes {
            match self.plan(v, cfg.size) {
                Ok(Plan::Thick { cow_bytes }) => {
                    thick.entry(v.vg.as_str()).or_default().push((v.full(), cow_bytes))
                }
                Ok(Plan::Thin { pool }) => drop(pools.insert((v.vg.clone(), pool))),
                Err(e) => problems.push(format!("{e:#}")),
            }
        }
        let mut summary = Vec::new();
        for (vg, snaps) in &thick {
            let need: u64 = snaps.iter().map(|(_, b)| b).sum();
            let free = match self.vgs.get(*vg) {
                Some(row) => bytes("vg_free", &row.vg_free)?,
                None => {
                    problems.push(format!("volume group {vg} not found"));
                    continue;
                }
            };
            if need > free {
                let each: Vec<String> =
                    snaps.iter().map(|(v, b)| format!("{v} {}", human(*b))).collect();
                problems.push(format!(
                    "volume group {vg} has {} free but the thick snapshots need {} ({}): extend the volume group or lower snapshot.snapshot_size",
                    human(free),
                    human(need),
                    each.join(", ")
                ));
            } else {
                summary.push(format!(
                    "{vg}: thick snapshots need {} of {} free",
                    human(need),
                    human(free)
                ));
            }
        }
        for (vg, pool) in &pools {
            let Some(row) = self.lv(vg, pool) else {
                problems.push(format!("thin pool {vg}/{pool} not found"));
                continue;
            };
            let data = percent(&row.data_percent);
            let meta = percent(&row.metadata_percent);
            let shown = |p: Option<f64>| p.map_or("unknown".into(), |p| format!("{p:.1}%"));
            let over = [("data", data), ("metadata", meta)]
                .into_iter()
                .filter(|(_, p)| p.is_none_or(|p| p > cfg.max_percent))
                .map(|(what, p)| format!("{what} {}", shown(p)))
                .collect::<Vec<_>>();
            if over.is_empty() {
                summary.push(format!(
                    "thin pool {vg}/{pool} data {}, metadata {} (limit {}%)",
                    shown(data),
                    shown(meta),
                    cfg.max_percent
                ));
            } else {
                problems.push(format!(
                    "thin pool {vg}/{pool} is above snapshot.thin_pool_max_percent ({}%): {}; extend the pool or free space in it",
                    cfg.max_percent,
                    over.join(", ")
                ));
            }
        }
        if problems.is_empty() {
            Ok(summary.join("; "))
        } else {
            Err(anyhow!("{}", problems.join("; ")))
        }
    }
}

/// "12.0 MiB": sizes in messages.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// The parsed config the provider runs with.
#[derive(Debug, Clone)]
struct Settings {
    size: SnapshotSize,
    max_percent: f64,
    timeout: Duration,
}

/// Snapshots logical volumes in the volume groups of the configured volumes.
pub struct Lvm {
    settings: Settings,
    /// Where `list` and `delete` look: the configured volumes' volume groups.
    vgs: Vec<String>,
    program: String,
}

impl Lvm {
    /// The provider for `volumes` (`vg/lv`); a config the validation would refuse is an error.
    pub fn new(config: &LvmConfig, volumes: &[String]) -> anyhow::Result<Lvm> {
        let mut problems = Vec::new();
        config.problems(volumes, &mut problems);
        if !problems.is_empty() {
            bail!("{}", problems.join("; "));
        }
        let vgs: BTreeSet<String> =
            volumes.iter().filter_map(|v| Volume::parse(v).ok()).map(|v| v.vg).collect();
        Ok(Lvm {
            settings: Settings {
                size: SnapshotSize::parse(&config.snapshot_size)?,
                max_percent: config.thin_pool_max_percent,
                timeout: Duration::from_millis(config.command_timeout_ms),
            },
            vgs: vgs.into_iter().collect(),
            program: "lvm".into(),
        })
    }

    /// Runs `lvm <args>` under the timeout; its stdout, or an error with its stderr.
    fn lvm(&self, args: &[String]) -> anyhow::Result<String> {
        run(&self.program, args, self.settings.timeout)
    }

    fn state(&self, vgs: &[String]) -> anyhow::Result<State> {
        let lvs = parse_lvs(&self.lvm(&lvs_args(vgs))?)?;
        let vgs = parse_vgs(&self.lvm(&vgs_args(vgs))?)?;
        Ok(State { lvs, vgs: vgs.into_iter().map(|v| (v.vg_name.clone(), v)).collect() })
    }

    fn volumes(volumes: &[String]) -> anyhow::Result<(Vec<Volume>, Vec<String>)> {
        let parsed =
            volumes.iter().map(|v| Volume::parse(v)).collect::<anyhow::Result<Vec<_>>>()?;
        let vgs: BTreeSet<String> = parsed.iter().map(|v| v.vg.clone()).collect();
        Ok((parsed, vgs.into_iter().collect()))
    }

    fn snapshot_of(volume: &Volume, name: &str, size_bytes: u64) -> Snapshot {
        Snapshot {
            volume: volume.full(),
            provider: KIND.into(),
            locator: format!("/dev/{}/{name}", volume.vg),
            // The snapshot device reads as the origin: what a copy reads.
            size_bytes,
        }
    }

    fn remove(&self, vg: &str, name: &str) -> anyhow::Result<()> {
        self.lvm(&["lvremove".into(), "--yes".into(), format!("{vg}/{name}")]).map(drop)
    }

    /// Takes every volume's snapshot in order; on the first failure the caller deletes what
    /// this call made.
    fn create_each(
        &self,
        backup_id: &str,
        volumes: &[Volume],
        state: &State,
        made: &mut Vec<(String, String)>,
    ) -> anyhow::Result<Vec<Snapshot>> {
        let mut out = Vec::new();
        for v in volumes {
            let name = snapshot_name(&v.lv, backup_id)?;
            let origin = state
                .lv(&v.vg, &v.lv)
                .ok_or_else(|| anyhow!("{v}: no such logical volume (see lvs {})", v.vg))?;
            let origin_bytes = origin.size()?;
            if let Some(existing) = state.lv(&v.vg, &name) {
                if existing.backup() != Some(backup_id) || existing.origin != v.lv {
                    bail!(
                        "{v}: an LV named {} exists but is not this backup's snapshot of it (tags {:?}); remove or rename it",
                        name,
                        existing.lv_tags
                    );
                }
                // Idempotent: taken before, returned as it is (activated if it was not).
                if !existing.is_active() {
                    self.lvm(&[
                        "lvchange".into(),
                        "--activate".into(),
                        "y".into(),
                        "--ignoreactivationskip".into(),
                        format!("{}/{name}", v.vg),
                    ])
                    .with_context(|| format!("activate snapshot {}/{name}", v.vg))?;
                }
                out.push(Self::snapshot_of(v, &name, origin_bytes));
                continue;
            }
            let plan = state.plan(v, self.settings.size)?;
            self.lvm(&lvcreate_args(v, &name, backup_id, &plan))
                .with_context(|| format!("snapshot {v}"))?;
            made.push((v.vg.clone(), name.clone()));
            out.push(Self::snapshot_of(v, &name, origin_bytes));
        }
        Ok(out)
    }

    /// Every LV tagged with a backup in this provider's volume groups.
    fn tagged(&self) -> anyhow::Result<Vec<LvRow>> {
        if self.vgs.is_empty() {
            return Ok(Vec::new());
        }
        let rows = parse_lvs(&self.lvm(&lvs_args(&self.vgs))?)?;
        Ok(rows.into_iter().filter(|r| r.backup().is_some()).collect())
    }
}

impl SnapshotProvider for Lvm {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn check(&self, volumes: &[String]) -> anyhow::Result<String> {
        let (volumes, vgs) = Self::volumes(volumes)?;
        self.state(&vgs)?.budget(&volumes, &self.settings)
    }

    fn create(&self, backup_id: &str, volumes: &[String]) -> anyhow::Result<Vec<Snapshot>> {
        let (volumes, vgs) = Self::volumes(volumes)?;
        let state = self.state(&vgs)?;
        let mut made = Vec::new();
        match self.create_each(backup_id, &volumes, &state, &mut made) {
            Ok(snaps) => Ok(snaps),
            Err(e) => {
                // Leave nothing half-made: remove what this call created, newest first.
                let mut left = Vec::new();
                for (vg, name) in made.iter().rev() {
                    if let Err(r) = self.remove(vg, name) {
                        left.push(format!("{vg}/{name} ({r:#})"));
                    }
                }
                if left.is_empty() {
                    Err(e
                        .context(format!("removed the {} snapshot(s) taken before it", made.len())))
                } else {
                    Err(e.context(format!(
                        "removing the snapshots taken before it failed too: {}",
                        left.join(", ")
                    )))
                }
            }
        }
    }

    fn delete(&self, backup_id: &str) -> anyhow::Result<u32> {
        let mut deleted = 0;
        for row in self.tagged()?.into_iter().filter(|r| r.backup() == Some(backup_id)) {
            self.remove(&row.vg_name, &row.lv_name)
                .with_context(|| format!("delete snapshot {}/{}", row.vg_name, row.lv_name))?;
            deleted += 1;
        }
        Ok(deleted)
    }

    fn list(&self) -> anyhow::Result<Vec<(String, Snapshot)>> {
        if self.vgs.is_empty() {
            return Ok(Vec::new());
        }
        let rows = parse_lvs(&self.lvm(&lvs_args(&self.vgs))?)?;
        Ok(listed(&rows))
    }
}

/// The snapshots among `rows`, by backup: the volume is the origin, and the size what the
/// device reads, the origin's (a thick snapshot's own `lv_size` is its copy-on-write space).
pub fn listed(rows: &[LvRow]) -> Vec<(String, Snapshot)> {
    let mut out = Vec::new();
    for row in rows {
        let Some(backup) = row.backup() else { continue };
        let origin = rows.iter().find(|r| r.vg_name == row.vg_name && r.lv_name == row.origin);
        let size = origin.unwrap_or(row).size().unwrap_or(0);
        let volume = Volume { vg: row.vg_name.clone(), lv: row.origin.clone() };
        out.push((backup.to_string(), Lvm::snapshot_of(&volume, &row.lv_name, size)));
    }
    out
}

/// Runs `program args` (no shell) until it exits or `timeout` kills it: its whole stdout, or
/// an error naming the command, how it ended and the tail of its stderr.
fn run(program: &str, args: &[String], timeout: Duration) -> anyhow::Result<String> {
    let shown = format!("{program} {}", args.join(" "));
    let mut child = Command::new(program)
        .args(args)
        // LVM warns about every inherited descriptor; nothing of ours leaks (CLOEXEC).
        .env("LVM_SUPPRESS_FD_WARNINGS", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("run {program} (is lvm2 installed, and is this root?)"))?;
    let stdout = reader(child.stdout.take(), usize::MAX);
    let stderr = reader(child.stderr.take(), STDERR_TAIL);
    let started = Instant::now();
    let mut nap = Duration::from_millis(1);
    let status = loop {
        if let Some(status) = child.try_wait().with_context(|| format!("wait for {shown}"))? {
            break status;
        }
        if started.elapsed() >= timeout {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "{shown}: timed out after {}ms and was killed{}",
                timeout.as_millis(),
                stderr_suffix(&collect(&stderr))
            );
        }
        std::thread::sleep(nap);
        nap = (nap * 2).min(Duration::from_millis(20));
    };
    if !status.success() {
        bail!("{shown}: failed with {status}{}", stderr_suffix(&collect(&stderr)));
    }
    Ok(collect(&stdout))
}

/// Reads a pipe on its own thread, keeping at most its last `keep` bytes.
fn reader(pipe: Option<impl Read + Send + 'static>, keep: usize) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    if let Some(mut pipe) = pipe {
        std::thread::spawn(move || {
            let mut all = Vec::new();
            let mut buf = [0u8; 8192];
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                all.extend_from_slice(&buf[..n]);
                if all.len() > keep.saturating_mul(2) {
                    all.drain(..all.len() - keep);
                }
            }
            let _ = tx.send(all);
        });
    }
    rx
}

/// What a reader kept; a grandchild holding the pipe open does not block us for long.
fn collect(rx: &mpsc::Receiver<Vec<u8>>) -> String {
    String::from_utf8_lossy(&rx.recv_timeout(Duration::from_secs(2)).unwrap_or_default())
        .into_owned()
}

fn stderr_suffix(stderr: &str) -> String {
    let lines: Vec<&str> = stderr.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    if lines.is_empty() {
        String::new()
    } else {
        format!("; stderr: {}", lines.join(" / "))
    }
}

#[cfg(test)]
mod tests;
