//! A reader of qcow2 metadata (qemu's docs/interop/qcow2.txt): the header, the internal
//! snapshot table, each snapshot's L1 and L2 tables, and the comparison of two snapshots' cluster
//! mappings. Reads through [`Source`] (a file at the edge, bytes in tests) and never trusts a
//! field: anything it cannot prove unchanged is changed, anything odd is an error naming it.

use std::io;
use std::ops::Range;

const MAGIC: &[u8; 4] = b"QFI\xfb";
/// qemu's limits, so a corrupt count cannot make us read gigabytes.
const MAX_SNAPSHOTS: u32 = 65_536;
const MAX_SNAPSHOT_TABLE: u64 = 64 << 20;
const MAX_EXTRA_DATA: u32 = 1024;
const MAX_L1_BYTES: u64 = 32 << 20;

/// Incompatible feature bits (header bytes 72-79) and what each means here.
const DIRTY: u64 = 1 << 0;
const CORRUPT: u64 = 1 << 1;
const EXTERNAL_DATA: u64 = 1 << 2;
const COMPRESSION_TYPE: u64 = 1 << 3;
const EXTENDED_L2: u64 = 1 << 4;

/// L1 entry: bits 9-55 the L2 table's offset; 63 COPIED (only meaningful in the active table).
const L1_OFFSET: u64 = 0x00ff_ffff_ffff_fe00;
const L1_RESERVED: u64 = 0x7f00_0000_0000_01ff;
/// L2 entry: 62 compressed, 63 COPIED; standard descriptor: bit 0 zero, 9-55 host offset.
const COPIED: u64 = 1 << 63;
const COMPRESSED: u64 = 1 << 62;
const ZERO: u64 = 1;
const L2_OFFSET: u64 = 0x00ff_ffff_ffff_fe00;
const L2_RESERVED: u64 = 0x3f00_0000_0000_01fe;

/// Where the metadata is read from: the image file, or bytes in tests.
pub trait Source {
    /// Fills `buf` from `offset`; an error (`UnexpectedEof` past the end) if it cannot.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// The image's length in bytes.
    fn size(&self) -> io::Result<u64>;
}

impl Source for std::fs::File {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(self, buf, offset)
    }

    fn size(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }
}

impl Source for [u8] {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let start = usize::try_from(offset).map_err(|_| io::ErrorKind::UnexpectedEof)?;
        let end = start.checked_add(buf.len()).ok_or(io::ErrorKind::UnexpectedEof)?;
        let from = self.get(start..end).ok_or(io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(from);
        Ok(())
    }

    fn size(&self) -> io::Result<u64> {
        Ok(self.len() as u64)
    }
}

/// Why two snapshots cannot be compared (or an image not read): a sentence naming the field.
pub type Why = String;

/// The header fields the comparison depends on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub cluster_bits: u32,
    /// The active layer's virtual size (each snapshot records its own).
    pub size: u64,
    nb_snapshots: u32,
    snapshots_offset: u64,
}

impl Header {
    fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }
}

/// One entry of the snapshot table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotEntry {
    pub id: String,
    pub name: String,
    l1_offset: u64,
    l1_size: u32,
    date_sec: u32,
    date_nsec: u32,
    vm_clock_ns: u64,
    /// The virtual disk size at the snapshot (extra data bytes 48-55), when recorded.
    pub disk_size: Option<u64>,
}

impl SnapshotEntry {
    /// What this snapshot must still be for a base recorded as it to be trusted: a snapshot
    /// deleted and made again under the same name differs in its date at least (and mostly in
    /// its id and L1 table too).
    pub fn identity(&self) -> String {
        format!(
            "id {} l1 {:#x}/{} date {}.{:09} vm-clock {} size {}",
            self.id,
            self.l1_offset,
            self.l1_size,
            self.date_sec,
            self.date_nsec,
            self.vm_clock_ns,
            self.disk_size.map_or_else(|| "unknown".to_string(), |s| s.to_string())
        )
    }
}

/// A qcow2 image whose header and snapshot table were read and checked.
pub struct Image<'a, S: Source + ?Sized> {
    src: &'a S,
    file_len: u64,
    pub header: Header,
    pub snapshots: Vec<SnapshotEntry>,
}

fn be32(b: &[u8], at: usize) -> u32 {
    let mut a = [0; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(a)
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

impl<'a, S: Source + ?Sized> Image<'a, S> {
    /// Reads and checks the header and the snapshot table. Images this reader cannot compare
    /// soundly (a backing file, encryption, an external data file, extended L2 entries, a dirty
    /// or corrupt flag, unknown incompatible features) are refused here, saying which.
    pub fn open(src: &'a S) -> Result<Self, Why> {
        let file_len = src.size().map_err(|e| format!("image size: {e}"))?;
        let mut h = [0u8; 104];
        let short = |e: io::Error| format!("header: {e} (the file is {file_len} bytes)");
        src.read_exact_at(&mut h[..72], 0).map_err(short)?;
        if &h[0..4] != MAGIC {
            return Err("not a qcow2 image (bad magic)".into());
        }
        let version = be32(&h, 4);
        if version != 2 && version != 3 {
            return Err(format!("qcow2 version {version} (this reader knows 2 and 3)"));
        }
        let backing_offset = be64(&h, 8);
        let cluster_bits = be32(&h, 20);
        let size = be64(&h, 24);
        let crypt = be32(&h, 32);
        let nb_snapshots = be32(&h, 60);
        let snapshots_offset = be64(&h, 64);
        if !(9..=21).contains(&cluster_bits) {
            return Err(format!("cluster_bits {cluster_bits} is outside 9..=21"));
        }
        if version == 3 {
            src.read_exact_at(&mut h[72..104], 72).map_err(short)?;
            let incompatible = be64(&h, 72);
            let header_length = be32(&h, 100);
            if header_length < 104 {
                return Err(format!("header_length {header_length} is below 104"));
            }
            let named = [
                (DIRTY, "the dirty flag (not closed cleanly: refcounts may be stale)"),
                (CORRUPT, "the corrupt flag"),
                (EXTERNAL_DATA, "an external data file"),
                (
                    EXTENDED_L2,
                    "extended L2 entries (subclusters), which this reader does not compare",
                ),
            ];
            for (bit, what) in named {
                if incompatible & bit != 0 {
                    return Err(format!("the image has {what}"));
                }
            }
            let unknown =
                incompatible & !(DIRTY | CORRUPT | EXTERNAL_DATA | COMPRESSION_TYPE | EXTENDED_L2);
            if unknown != 0 {
                return Err(format!("unknown incompatible features {unknown:#x}"));
            }
        }
        if backing_offset != 0 {
            return Err("the image has a backing file (unallocated clusters read from it)".into());
        }
        if crypt != 0 {
            return Err(format!("the image is encrypted (crypt_method {crypt})"));
        }
        let header = Header { version, cluster_bits, size, nb_snapshots, snapshots_offset };
        let mut image = Image { src, file_len, header, snapshots: Vec::new() };
        image.snapshots = image.read_snapshot_table()?;
        Ok(image)
    }

    fn read_snapshot_table(&self) -> Result<Vec<SnapshotEntry>, Why> {
        let (n, start) = (self.header.nb_snapshots, self.header.snapshots_offset);
        if n == 0 {
            return Ok(Vec::new());
        }
        if n > MAX_SNAPSHOTS {
            return Err(format!("{n} snapshots (qemu allows {MAX_SNAPSHOTS})"));
        }
        if !start.is_multiple_of(self.header.cluster_size()) || start >= self.file_len {
            return Err(format!(
                "snapshot table offset {start:#x} is not a cluster of the image ({} bytes)",
                self.file_len
            ));
        }
        let mut out = Vec::with_capacity(n as usize);
        let mut at = start;
        for i in 0..n {
            if at - start > MAX_SNAPSHOT_TABLE {
                return Err(format!("snapshot table longer than {MAX_SNAPSHOT_TABLE} bytes"));
            }
            let entry = |e: io::Error| format!("snapshot table entry {i} at {at:#x}: {e}");
            let mut fixed = [0u8; 40];
            self.src.read_exact_at(&mut fixed, at).map_err(entry)?;
            let extra_size = be32(&fixed, 36);
            if extra_size > MAX_EXTRA_DATA {
                return Err(format!(
                    "snapshot table entry {i}: {extra_size} bytes of extra data (qemu allows {MAX_EXTRA_DATA})"
                ));
            }
            let (id_size, name_size) = (be16(&fixed, 12), be16(&fixed, 14));
            let rest_len = extra_size as usize + usize::from(id_size) + usize::from(name_size);
            let mut rest = vec![0u8; rest_len];
            self.src.read_exact_at(&mut rest, at + 40).map_err(entry)?;
            let extra = &rest[..extra_size as usize];
            let id = &rest[extra.len()..extra.len() + usize::from(id_size)];
            let name = &rest[extra.len() + id.len()..];
            out.push(SnapshotEntry {
                id: String::from_utf8_lossy(id).into_owned(),
                name: String::from_utf8_lossy(name).into_owned(),
                l1_offset: be64(&fixed, 0),
                l1_size: be32(&fixed, 8),
                date_sec: be32(&fixed, 16),
                date_nsec: be32(&fixed, 20),
                vm_clock_ns: be64(&fixed, 24),
                disk_size: (extra.len() >= 16).then(|| be64(extra, 8)),
            });
            at += (40 + rest_len as u64).div_ceil(8) * 8;
        }
        Ok(out)
    }

    /// The one snapshot named `name`; none or several is an error.
    pub fn snapshot(&self, name: &str) -> Result<&SnapshotEntry, Why> {
        let mut named = self.snapshots.iter().filter(|s| s.name == name);
        match (named.next(), named.next()) {
            (Some(s), None) => Ok(s),
            (None, _) => Err(format!("no snapshot named {name}")),
            (Some(_), Some(_)) => Err(format!("several snapshots are named {name}")),
        }
    }

    /// The byte ranges of the guest disk where `new` may differ from `base` (sorted, disjoint,
    /// adjacent clusters merged). A guest cluster is unchanged only when both map it to the same
    /// host cluster (a cluster two snapshots reference has a refcount of 2 or more, so qcow2
    /// copies it before any write), both to the same compressed descriptor, or both read as
    /// zeros (the zero flag, or unallocated: there is no backing file). Two L1 entries naming
    /// the same L2 table share it whole, for the same reason.
    pub fn changes(
        &self,
        base: &SnapshotEntry,
        new: &SnapshotEntry,
    ) -> Result<Vec<Range<u64>>, Why> {
        let size = match (base.disk_size, new.disk_size) {
            (Some(a), Some(b)) if a == b => a,
            (Some(a), Some(b)) => {
                return Err(format!("virtual sizes differ: base {a} bytes, snapshot {b} bytes"))
            }
            _ => return Err("a snapshot records no virtual size (extra data)".into()),
        };
        let cs = self.header.cluster_size();
        let per_table = cs / 8;
        let clusters = size.div_ceil(cs);
        let tables = clusters.div_ceil(per_table);
        let l1_base = self.l1(base, tables)?;
        let l1_new = self.l1(new, tables)?;
        let mut out: Vec<Range<u64>> = Vec::new();
        let mut changed = |cluster: u64| {
            let start = cluster.saturating_mul(cs);
            let end = start.saturating_add(cs).min(size);
            match out.last_mut() {
                Some(last) if last.end == start => last.end = end,
                _ => out.push(start..end),
            }
        };
        for (t, (&a, &b)) in l1_base.iter().zip(&l1_new).enumerate() {
            let t = t as u64;
            if a == b {
                continue; // one L2 table (or none) for both
            }
            let first = t * per_table;
            let count = per_table.min(clusters - first);
            let l2_base = self.l2(a, count)?;
            let l2_new = self.l2(b, count)?;
            for (i, (&x, &y)) in l2_base.iter().zip(&l2_new).enumerate() {
                let cluster = first + i as u64;
                let at = || format!("guest cluster {cluster}");
                let (x, y) = (
                    self.mapping(x).map_err(|e| format!("{}: base: {e}", at()))?,
                    self.mapping(y).map_err(|e| format!("{}: snapshot: {e}", at()))?,
                );
                if x != y {
                    changed(cluster);
                }
            }
        }
        Ok(out)
    }

    /// The first `tables` entries of `snap`'s L1 table, as L2 table offsets (0: none).
    fn l1(&self, snap: &SnapshotEntry, tables: u64) -> Result<Vec<u64>, Why> {
        let what = format!("snapshot {} ({})", snap.name, snap.id);
        if u64::from(snap.l1_size) < tables {
            return Err(format!(
                "{what}: its L1 table has {} entries, its virtual size needs {tables}",
                snap.l1_size
            ));
        }
        let bytes = tables * 8;
        if bytes > MAX_L1_BYTES {
            return Err(format!(
                "{what}: an L1 table of {bytes} bytes (qemu allows {MAX_L1_BYTES})"
            ));
        }
        if snap.l1_offset == 0 || !snap.l1_offset.is_multiple_of(self.header.cluster_size()) {
            return Err(format!(
                "{what}: L1 table offset {:#x} is not cluster-aligned",
                snap.l1_offset
            ));
        }
        let raw = self.read(snap.l1_offset, bytes).map_err(|e| format!("{what}: L1 table: {e}"))?;
        raw.chunks_exact(8)
            .enumerate()
            .map(|(i, e)| {
                let e = be64(e, 0);
                if e & L1_RESERVED != 0 {
                    return Err(format!("{what}: L1 entry {i} {e:#x} has reserved bits set"));
                }
                let offset = e & L1_OFFSET;
                if !offset.is_multiple_of(self.header.cluster_size()) {
                    return Err(format!(
                        "{what}: L1 entry {i}: L2 table offset {offset:#x} is not cluster-aligned"
                    ));
                }
                Ok(offset)
            })
            .collect()
    }

    /// The first `count` entries of the L2 table at `offset` (0: no table, every entry 0).
    fn l2(&self, offset: u64, count: u64) -> Result<Vec<u64>, Why> {
        if offset == 0 {
            return Ok(vec![0; count as usize]);
        }
        let raw =
            self.read(offset, count * 8).map_err(|e| format!("L2 table at {offset:#x}: {e}"))?;
        Ok(raw.chunks_exact(8).map(|e| be64(e, 0)).collect())
    }

    /// What a guest cluster's L2 entry says it reads as.
    fn mapping(&self, entry: u64) -> Result<Mapping, Why> {
        let e = entry & !COPIED;
        if e & COMPRESSED != 0 {
            return Ok(Mapping::Compressed(e));
        }
        if e & L2_RESERVED != 0 {
            return Err(format!("L2 entry {entry:#x} has reserved bits set"));
        }
        if e & ZERO != 0 {
            if self.header.version < 3 {
                return Err(format!("L2 entry {entry:#x} has the zero flag in a version 2 image"));
            }
            return Ok(Mapping::Zeros);
        }
        let offset = e & L2_OFFSET;
        if offset == 0 {
            return Ok(Mapping::Zeros);
        }
        if !offset.is_multiple_of(self.header.cluster_size()) {
            return Err(format!("host offset {offset:#x} is not cluster-aligned"));
        }
        if offset >= self.file_len {
            return Err(format!(
                "host offset {offset:#x} is past the end of the image ({} bytes)",
                self.file_len
            ));
        }
        Ok(Mapping::Host(offset))
    }

    /// `len` bytes at `offset`, checked against the file's length first (a clear message).
    fn read(&self, offset: u64, len: u64) -> Result<Vec<u8>, Why> {
        let end =
            offset.checked_add(len).ok_or_else(|| format!("{offset:#x} + {len} overflows"))?;
        if end > self.file_len {
            return Err(format!(
                "{len} bytes at {offset:#x} run past the end of the image ({} bytes): truncated",
                self.file_len
            ));
        }
        let mut buf = vec![0u8; usize::try_from(len).map_err(|_| format!("{len} bytes"))?];
        self.src.read_exact_at(&mut buf, offset).map_err(|e| e.to_string())?;
        Ok(buf)
    }
}

/// What a guest cluster reads as, for comparing two snapshots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mapping {
    /// All zeros: the zero flag, or unallocated in an image without a backing file.
    Zeros,
    /// A standard cluster at this host offset.
    Host(u64),
    /// A compressed cluster with this descriptor (offset and sector count).
    Compressed(u64),
}

#[cfg(test)]
mod tests;
