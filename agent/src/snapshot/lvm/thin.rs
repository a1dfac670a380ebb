//! LVM thin change tracking for the agent's copy: after a thin LV's snapshot is copied, a thin
//! snapshot of it is kept as the group's base (`<lv>.stillpoint.base.<group>`, read-only, not
//! activated, tagged `stillpoint-base:<group>`, never `stillpoint-backup:`, so the provider's
//! list, delete and the sweep never see it); the next copy checks the base's identity and asks
//! `thin_delta` which blocks the two map differently (`delta.rs` reads its output). The pool's
//! metadata is read from a metadata snapshot reserved for the call and always released.
//! Thick LVs get no base and no map.

use std::sync::Mutex;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use serde::Deserialize;
use stillpoint_proto::Snapshot;
use stillpoint_saveset::{ChangeMap, MapSource};

use super::{delta, lvm_name_ok, run, Report, TAG_PREFIX};

/// Each `lvm` and `dmsetup` call is killed after this long (the copy has no provider config).
const LVM_TIMEOUT: Duration = Duration::from_secs(120);
/// `thin_delta` reads both devices' whole mapping trees: minutes on a pool of terabytes.
const DELTA_TIMEOUT: Duration = Duration::from_secs(1800);

/// The tag of a kept base: `stillpoint-base:<group>`.
pub const BASE_TAG_PREFIX: &str = "stillpoint-base:";

/// A pool holds one metadata snapshot at a time: this process's copies take turns.
static METADATA_SNAP: Mutex<()> = Mutex::new(());

/// What `lvs` says of a thin LV, as far as a base's identity and the comparison need.
const THIN_FIELDS: &str = "lv_name,vg_name,lv_uuid,segtype,pool_lv,thin_id,lv_time,lv_size,lv_tags";

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct ThinRow {
    pub lv_name: String,
    pub vg_name: String,
    #[serde(default)]
    pub lv_uuid: String,
    pub segtype: String,
    #[serde(default)]
    pub pool_lv: String,
    #[serde(default)]
    pub thin_id: String,
    #[serde(default)]
    pub lv_time: String,
    pub lv_size: String,
    #[serde(default)]
    pub lv_tags: String,
}

#[derive(Debug, Deserialize)]
struct ThinSection {
    #[serde(default)]
    lv: Vec<ThinRow>,
}

impl ThinRow {
    fn is_thin(&self) -> bool {
        self.segtype == "thin"
    }

    fn tags(&self) -> impl Iterator<Item = &str> {
        self.lv_tags.split(',').map(str::trim).filter(|t| !t.is_empty())
    }

    fn thin_id(&self) -> Result<u64, String> {
        self.thin_id.trim().parse().map_err(|_| {
            format!("lvs reported thin_id {:?} for {}/{}", self.thin_id, self.vg_name, self.lv_name)
        })
    }

    fn size(&self) -> Result<u64, String> {
        self.lv_size.trim().parse().map_err(|_| {
            format!("lvs reported lv_size {:?} for {}/{}", self.lv_size, self.vg_name, self.lv_name)
        })
    }

    /// What a kept base must still be: the same LV (uuid), the same thin device in the same
    /// pool, made at the same time, of the same size. One made again under its name differs.
    pub fn identity(&self) -> String {
        format!(
            "{}/{} uuid {} thin id {} in pool {} made {} size {}",
            self.vg_name,
            self.lv_name,
            self.lv_uuid,
            self.thin_id,
            self.pool_lv,
            self.lv_time,
            self.lv_size
        )
    }
}

/// Parses `lvs -a --reportformat json -o THIN_FIELDS` output.
pub fn parse_thin_rows(json: &str) -> anyhow::Result<Vec<ThinRow>> {
    let report: Report<ThinSection> =
        serde_json::from_str(json).context("parse lvs --reportformat json output")?;
    Ok(report.report.into_iter().flat_map(|s| s.lv).collect())
}

fn rows(vg: &str) -> anyhow::Result<Vec<ThinRow>> {
    let args: Vec<String> = [
        "lvs",
        "-a",
        "--reportformat",
        "json",
        "--units",
        "b",
        "--nosuffix",
        "-o",
        THIN_FIELDS,
        vg,
    ]
    .map(String::from)
    .into();
    parse_thin_rows(&run("lvm", &args, LVM_TIMEOUT)?)
}

/// The snapshot LV a locator names (`/dev/<vg>/<lv>`) and its origin's LV name (the volume's
/// `vg/lv`).
struct Located {
    vg: String,
    snapshot: String,
    origin: String,
}

fn locate(snap: &Snapshot) -> Result<Located, String> {
    let (vg, snapshot) =
        snap.locator
            .strip_prefix("/dev/")
            .and_then(|rest| rest.split_once('/'))
            .ok_or_else(|| format!("LVM locator {:?} is not /dev/<vg>/<lv>", snap.locator))?;
    let (vvg, origin) = snap
        .volume
        .split_once('/')
        .ok_or_else(|| format!("LVM volume {:?} is not vg/lv", snap.volume))?;
    if vvg != vg || ![vg, snapshot, origin].iter().all(|n| lvm_name_ok(n)) {
        return Err(format!(
            "LVM snapshot {} of {} is not named as this provider names them",
            snap.locator, snap.volume
        ));
    }
    Ok(Located { vg: vg.into(), snapshot: snapshot.into(), origin: origin.into() })
}

/// The name of `group`'s base of origin LV `lv`: `<lv>.stillpoint.base.<group>` (without a
/// group, `<lv>.stillpoint.base`), within the length LVM leaves a name here.
pub fn base_name(lv: &str, group: &str) -> anyhow::Result<String> {
    let name = if group.is_empty() {
        format!("{lv}.stillpoint.base")
    } else {
        stillpoint_core::validate_name("group", group)?;
        format!("{lv}.stillpoint.base.{group}")
    };
    if name.len() > 100 || !lvm_name_ok(&name) {
        bail!("the base's name {name} is longer than LVM allows here (about 100): shorten the LV's or the group's name");
    }
    Ok(name)
}

/// The tag of `group`'s bases.
pub fn base_tag(group: &str) -> String {
    if group.is_empty() {
        BASE_TAG_PREFIX.trim_end_matches(':').to_string()
    } else {
        format!("{BASE_TAG_PREFIX}{group}")
    }
}

/// Whether the LV snapshot `snap` is a thin one, which change maps can be made of: `Err` says
/// why not, as the stats show it (`none: <volume> is a thick LV...`, or `unknown: ...` when
/// `lvs` cannot tell).
pub fn mappable(snap: &Snapshot) -> Result<(), String> {
    let at = locate(snap).map_err(|e| format!("unknown: {e}"))?;
    let rows = rows(&at.vg).map_err(|e| format!("unknown: {e:#}"))?;
    let row = rows
        .iter()
        .find(|r| r.lv_name == at.snapshot)
        .ok_or_else(|| format!("unknown: snapshot {}/{} not found by lvs", at.vg, at.snapshot))?;
    if row.is_thin() {
        Ok(())
    } else {
        Err(format!(
            "none: {} is a thick LV (segment type {}): only thin LVs' snapshots have change maps",
            snap.volume, row.segtype
        ))
    }
}

/// Which bytes of thin snapshot `snap` may differ from `group`'s kept base, which must still
/// have the `identity` recorded when it was kept. `Err("none: why")` when the base cannot be
/// trusted (gone, made again, in another pool, of another size): back up without it.
/// `Ok(Unknown)` when the pool cannot be compared (no metadata snapshot, `thin_delta` failed or
/// said something `delta.rs` refuses).
pub fn changes_since_base(
    snap: &Snapshot,
    group: &str,
    identity: &str,
) -> Result<ChangeMap, String> {
    let at = locate(snap).map_err(|e| format!("none: {e}"))?;
    let base = base_name(&at.origin, group).map_err(|e| format!("none: {e:#}"))?;
    let rows = rows(&at.vg).map_err(|e| format!("none: {e:#}"))?;
    let find = |name: &str| rows.iter().find(|r| r.lv_name == name);
    let kept = find(&base).ok_or_else(|| format!("none: base {}/{base} is gone", at.vg))?;
    let now = kept.identity();
    if now != identity {
        return Err(format!(
            "none: base {}/{base} is not the one kept (kept {identity}; now {now})",
            at.vg
        ));
    }
    let new = find(&at.snapshot)
        .ok_or_else(|| format!("none: snapshot {}/{} not found by lvs", at.vg, at.snapshot))?;
    if !new.is_thin() || new.pool_lv != kept.pool_lv {
        return Err(format!(
            "none: snapshot {}/{} is not a thin LV in the base's pool {}",
            at.vg, at.snapshot, kept.pool_lv
        ));
    }
    let size = new.size().map_err(|e| format!("none: {e}"))?;
    if kept.size().map_err(|e| format!("none: {e}"))? != size {
        return Err(format!(
            "none: {} was resized since the base was kept ({} bytes, now {size})",
            snap.volume, kept.lv_size
        ));
    }
    let (left, right) = match (kept.thin_id(), new.thin_id()) {
        (Ok(l), Ok(r)) => (l, r),
        (Err(e), _) | (_, Err(e)) => return Ok(ChangeMap::Unknown(e)),
    };
    let pool = format!("{}/{}", at.vg, kept.pool_lv);
    Ok(match compare(&at.vg, &kept.pool_lv, left, right, size) {
        Ok(changed) => stillpoint_saveset::failpoint(ChangeMap::Ranges {
            source: MapSource::LvmThin,
            ranges: changed,
        }),
        Err(why) => ChangeMap::Unknown(format!("thin pool {pool}: {why}")),
    })
}

/// `thin_delta` between thin devices `left` and `right` of pool `vg/pool`, on a metadata
/// snapshot reserved for this call: the changed byte ranges of a device of `size` bytes.
fn compare(
    vg: &str,
    pool: &str,
    left: u64,
    right: u64,
    size: u64,
) -> Result<Vec<std::ops::Range<u64>>, String> {
    let target = pool_target(vg, pool)?;
    let _turn = METADATA_SNAP.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    // The pool's transaction before the reservation: the metadata thin_delta reads must be at
    // least this new, or it is an older metadata snapshot (someone else's) than the devices.
    let transaction = transaction_id(&dmsetup(&["status", &target.name])?)?;
    let held = MetadataSnap::reserve(&target.name)?;
    let args: Vec<String> = vec![
        "-m".into(),
        "--snap1".into(),
        left.to_string(),
        "--snap2".into(),
        right.to_string(),
        target.metadata.clone(),
    ];
    let out = run("thin_delta", &args, DELTA_TIMEOUT)
        .map_err(|e| format!("{e:#} (is thin-provisioning-tools installed?)"));
    drop(held);
    let delta = delta::parse(&out?, left, right, size)
        .map_err(|why| format!("thin_delta said something not understood: {why}"))?;
    if delta.block_bytes != target.block_bytes {
        return Err(format!(
            "thin_delta says blocks of {} bytes, the pool's table {}",
            delta.block_bytes, target.block_bytes
        ));
    }
    if delta.transaction < transaction {
        return Err(format!(
            "the metadata snapshot read is of transaction {}, older than the pool's {transaction}",
            delta.transaction
        ));
    }
    Ok(delta.changed)
}

/// The pool's thin-pool device-mapper target: its name, its metadata device, its block size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolTarget {
    pub name: String,
    /// `/dev/mapper/<name of the metadata device>`.
    pub metadata: String,
    pub block_bytes: u64,
}

/// The device-mapper name LVM gives `vg/lv` (each `-` in a name doubled, then joined by `-`).
pub fn dm_name(vg: &str, lv: &str) -> String {
    format!("{}-{}", vg.replace('-', "--"), lv.replace('-', "--"))
}

/// Finds the thin-pool target of `vg/pool`: LVM stacks it as `<vg>-<pool>-tpool` under the
/// pool's own device once thin LVs use it, else the pool's device is the target itself.
fn pool_target(vg: &str, pool: &str) -> Result<PoolTarget, String> {
    let plain = dm_name(vg, pool);
    let mut tried = Vec::new();
    for name in [format!("{plain}-tpool"), plain] {
        match dmsetup(&["table", &name]) {
            Ok(table) => match thin_pool_table(&table) {
                Ok((dev, block_bytes)) => {
                    let sys = format!("/sys/dev/block/{dev}/dm/name");
                    let meta = std::fs::read_to_string(&sys)
                        .map_err(|e| format!("the pool's metadata device {dev}: {sys}: {e}"))?;
                    let meta = meta.trim();
                    if meta.is_empty() || meta.contains('/') {
                        return Err(format!("the pool's metadata device {dev} is named {meta:?}"));
                    }
                    return Ok(PoolTarget {
                        name,
                        metadata: format!("/dev/mapper/{meta}"),
                        block_bytes,
                    });
                }
                Err(why) => tried.push(format!("{name}: {why}")),
            },
            Err(why) => tried.push(why),
        }
    }
    Err(format!("no thin-pool target found ({})", tried.join("; ")))
}

/// From `dmsetup table` of a thin-pool target (`0 <len> thin-pool <meta maj:min> <data maj:min>
/// <block sectors> ...`): the metadata device and the block size in bytes.
pub fn thin_pool_table(table: &str) -> Result<(String, u64), String> {
    let line = table.lines().next().unwrap_or_default();
    let f: Vec<&str> = line.split_whitespace().collect();
    match f.as_slice() {
        [_, _, "thin-pool", meta, _, sectors, ..] => {
            let ok_dev = meta.split_once(':').is_some_and(|(a, b)| {
                !a.is_empty()
                    && !b.is_empty()
                    && (a.bytes().chain(b.bytes())).all(|c| c.is_ascii_digit())
            });
            let sectors: u64 =
                sectors.parse().map_err(|_| format!("block size {sectors:?} in {line:?}"))?;
            if !ok_dev || sectors == 0 || table.lines().count() != 1 {
                return Err(format!("not a thin-pool table: {line:?}"));
            }
            sectors
                .checked_mul(512)
                .map(|b| (meta.to_string(), b))
                .ok_or_else(|| format!("block size overflows in {line:?}"))
        }
        _ => Err(format!("not a thin-pool table: {line:?}")),
    }
}

/// The transaction id from `dmsetup status` of a thin-pool target (`0 <len> thin-pool <id> ...`).
pub fn transaction_id(status: &str) -> Result<u64, String> {
    let f: Vec<&str> = status.split_whitespace().collect();
    match f.as_slice() {
        [_, _, "thin-pool", id, ..] => {
            id.parse().map_err(|_| format!("thin-pool status {status:?}"))
        }
        _ => Err(format!("not a thin-pool status: {:?}", status.trim())),
    }
}

fn dmsetup(args: &[&str]) -> Result<String, String> {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    run("dmsetup", &args, LVM_TIMEOUT).map_err(|e| format!("{e:#}"))
}

/// A metadata snapshot of a pool, held while `thin_delta` reads it, released when dropped.
struct MetadataSnap {
    target: String,
}

impl MetadataSnap {
    fn reserve(target: &str) -> Result<MetadataSnap, String> {
        match dmsetup(&["message", target, "0", "reserve_metadata_snap"]) {
            Ok(_) => Ok(MetadataSnap { target: target.into() }),
            Err(e) if e.contains("busy") => Err(format!(
                "the pool already holds a metadata snapshot (another tool's, or one an agent left when it stopped midway), so nothing was compared; once no tool uses it: dmsetup message {target} 0 release_metadata_snap ({e})"
            )),
            Err(e) => Err(e),
        }
    }
}

impl Drop for MetadataSnap {
    fn drop(&mut self) {
        if let Err(e) = dmsetup(&["message", &self.target, "0", "release_metadata_snap"]) {
            tracing::warn!(pool = %self.target, error = %e, "could not release the thin pool's metadata snapshot; the next change map of this pool will say so");
        }
    }
}

/// Makes `group`'s base of `snap`'s volume a thin snapshot of `snap` (the snapshot just backed
/// up, read-only since its creation, so the base holds what the backup's manifest holds) and
/// returns its identity: deletes the old base (only an LV tagged as this group's base), then
/// snapshots `snap` read-only, not activated, tagged `stillpoint-base:<group>`. Run after the
/// manifest is written and before the backup's cleanup deletes `snap`.
pub fn keep_base(snap: &Snapshot, group: &str) -> anyhow::Result<String> {
    let at = locate(snap).map_err(|e| anyhow!(e))?;
    let base = base_name(&at.origin, group)?;
    let tag = base_tag(group);
    let before = rows(&at.vg)?;
    let source = before
        .iter()
        .find(|r| r.lv_name == at.snapshot)
        .ok_or_else(|| anyhow!("snapshot {}/{} not found by lvs", at.vg, at.snapshot))?;
    if !source.is_thin() {
        bail!("{} is not a thin LV: no base is kept", snap.volume);
    }
    if let Some(old) = before.iter().find(|r| r.lv_name == base) {
        if !old.tags().any(|t| t == tag) {
            bail!(
                "an LV {}/{base} exists but is not tagged {tag} (tags {:?}): not a base of this group; rename or remove it",
                at.vg,
                old.lv_tags
            );
        }
        run("lvm", &["lvremove".into(), "--yes".into(), format!("{}/{base}", at.vg)], LVM_TIMEOUT)
            .with_context(|| format!("delete the old base {}/{base}", at.vg))?;
    }
    let args: Vec<String> = [
        "lvcreate",
        "--snapshot",
        "--setactivationskip",
        "y",
        "--permission",
        "r",
        "--name",
        &base,
        "--addtag",
        &tag,
        &format!("{}/{}", at.vg, at.snapshot),
    ]
    .map(String::from)
    .into();
    run("lvm", &args, LVM_TIMEOUT)
        .with_context(|| format!("snapshot {} as the base {base}", snap.locator))?;
    let checked = (|| {
        let after = rows(&at.vg)?;
        let kept = after
            .iter()
            .find(|r| r.lv_name == base)
            .ok_or_else(|| anyhow!("the new base {}/{base} is not listed by lvs", at.vg))?;
        if !kept.is_thin() || kept.pool_lv != source.pool_lv {
            bail!("the new base {}/{base} is not a thin LV in pool {}", at.vg, source.pool_lv);
        }
        if kept.tags().any(|t| t.starts_with(TAG_PREFIX)) {
            bail!("the new base {}/{base} carries a backup's tag ({}): the provider would take it for a snapshot", at.vg, kept.lv_tags);
        }
        Ok(kept.identity())
    })();
    if checked.is_err() {
        let _ = run(
            "lvm",
            &["lvremove".into(), "--yes".into(), format!("{}/{base}", at.vg)],
            LVM_TIMEOUT,
        );
    }
    checked
}

#[cfg(test)]
mod tests;
