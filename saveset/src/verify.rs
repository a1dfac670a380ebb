//! Checking a repository: every chunk every manifest references is indexed and inside a pack
//! that exists; with `read_data`, every such chunk decrypts and matches its id. Reports damage
//! by name (manifest, chunk, pack file, offset); never repairs.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::PathBuf;

use crate::manifest::{ChunkId, Manifest, ManifestId, PackId};
use crate::repo::{runs, ChunkLoc, Repository};

/// What `verify` found.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// Manifests checked.
    pub manifests: usize,
    /// Distinct chunks referenced by them.
    pub chunks: usize,
    /// Chunks read, decrypted and re-hashed (`read_data` only).
    pub chunks_read: usize,
    /// Everything found wrong, in a stable order.
    pub damage: Vec<Damage>,
}

impl Report {
    /// True when nothing is damaged.
    pub fn is_ok(&self) -> bool {
        self.damage.is_empty()
    }
}

/// One problem, naming what is damaged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Damage {
    /// An index file that does not decrypt or parse; the chunks it listed look missing.
    Index { path: PathBuf, reason: String },
    /// A manifest that does not decrypt or parse.
    Manifest { manifest: ManifestId, reason: String },
    /// A backup manifest names a volume manifest that is not there.
    VolumeManifestMissing { backup: ManifestId, volume: ManifestId },
    /// A referenced chunk that no index lists.
    ChunkNotIndexed { manifest: ManifestId, chunk: ChunkId },
    /// The pack holding a referenced chunk is missing, or too short to hold it.
    PackMissing { manifest: ManifestId, chunk: ChunkId, pack: PathBuf, offset: u64 },
    /// A chunk that does not decrypt, decompress or match its id.
    ChunkCorrupt {
        manifest: ManifestId,
        chunk: ChunkId,
        pack: PathBuf,
        offset: u64,
        reason: String,
    },
}

impl fmt::Display for Damage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Damage::Index { path, reason } => write!(f, "index {}: {reason}", path.display()),
            Damage::Manifest { manifest, reason } => write!(f, "manifest {manifest}: {reason}"),
            Damage::VolumeManifestMissing { backup, volume } => {
                write!(f, "manifest {backup}: volume manifest {volume} is missing")
            }
            Damage::ChunkNotIndexed { manifest, chunk } => {
                write!(f, "manifest {manifest}: chunk {chunk} is in no index")
            }
            Damage::PackMissing { manifest, chunk, pack, offset } => write!(
                f,
                "manifest {manifest}: chunk {chunk}: pack {} at offset {offset} is missing",
                pack.display()
            ),
            Damage::ChunkCorrupt { manifest, chunk, pack, offset, reason } => write!(
                f,
                "manifest {manifest}: chunk {chunk} in pack {} at offset {offset} {reason}",
                pack.display()
            ),
        }
    }
}

impl Repository {
    /// Checks every manifest against the index files and packs on disk now (not the index
    /// loaded at open), and with `read_data` reads each referenced chunk once.
    pub fn verify(&self, read_data: bool) -> crate::Result<Report> {
        let mut report = Report::default();
        let mut index: HashMap<ChunkId, ChunkLoc> = HashMap::new();
        let mut index_ids: Vec<PackId> = self.list_ids("index")?;
        index_ids.sort();
        for id in index_ids {
            match self.read_index(id) {
                Ok(entries) => {
                    for (chunk, loc) in entries {
                        index.entry(chunk).or_insert(loc);
                    }
                }
                Err(e) => report.damage.push(Damage::Index {
                    path: self.storage.describe(&format!("index/{id}")),
                    reason: e.to_string(),
                }),
            }
        }
        let packs = self.list_packs()?;
        let manifest_ids = self.list_manifests()?;
        // Chunk → the manifests that reference it (ordered, for a stable report).
        let mut users: BTreeMap<ChunkId, Vec<ManifestId>> = BTreeMap::new();
        for &mid in &manifest_ids {
            report.manifests += 1;
            match self.load_manifest(mid) {
                Ok(Manifest::Volume(m)) => {
                    for id in m.chunks.iter().flatten() {
                        let u = users.entry(*id).or_default();
                        if u.last() != Some(&mid) {
                            u.push(mid);
                        }
                    }
                }
                Ok(Manifest::Backup(b)) => {
                    for v in b.volumes {
                        if !manifest_ids.contains(&v) {
                            report
                                .damage
                                .push(Damage::VolumeManifestMissing { backup: mid, volume: v });
                        }
                    }
                }
                Err(e) => {
                    report.damage.push(Damage::Manifest { manifest: mid, reason: e.to_string() })
                }
            }
        }
        report.chunks = users.len();
        // Present chunks by pack, in offset order, for sequential reads.
        let mut to_read: BTreeMap<PackId, Vec<(u64, ChunkId, ChunkLoc)>> = BTreeMap::new();
        for (chunk, ms) in &users {
            let Some(loc) = index.get(chunk) else {
                for &m in ms {
                    report.damage.push(Damage::ChunkNotIndexed { manifest: m, chunk: *chunk });
                }
                continue;
            };
            let fits = packs.get(&loc.pack).is_some_and(|&n| loc.offset + u64::from(loc.len) <= n);
            if !fits {
                for &m in ms {
                    report.damage.push(Damage::PackMissing {
                        manifest: m,
                        chunk: *chunk,
                        pack: self.pack_path(loc.pack),
                        offset: loc.offset,
                    });
                }
                continue;
            }
            to_read.entry(loc.pack).or_default().push((loc.offset, *chunk, *loc));
        }
        if read_data {
            for chunks in to_read.values_mut() {
                chunks.sort_by_key(|&(off, chunk, _)| (off, chunk));
                let locs: Vec<ChunkLoc> = chunks.iter().map(|&(_, _, loc)| loc).collect();
                for run in runs(&locs, 64 << 10, 8 << 20) {
                    let (first, last) = (locs[run.start], locs[run.end - 1]);
                    let end = last.offset + u64::from(last.len);
                    let bytes = self.read_pack(first.pack, first.offset..end);
                    for &(_, chunk, loc) in &chunks[run] {
                        report.chunks_read += 1;
                        let reason = match &bytes {
                            Ok(b) => {
                                let at = usize::try_from(loc.offset - first.offset)
                                    .expect("inside the run");
                                let blob = &b[at..at + loc.len as usize];
                                self.decode_chunk(chunk, blob).err().map(str::to_owned)
                            }
                            Err(e) => Some(e.to_string()),
                        };
                        if let Some(reason) = reason {
                            for &m in &users[&chunk] {
                                report.damage.push(Damage::ChunkCorrupt {
                                    manifest: m,
                                    chunk,
                                    pack: self.pack_path(loc.pack),
                                    offset: loc.offset,
                                    reason: reason.clone(),
                                });
                            }
                        }
                    }
                }
            }
        }
        Ok(report)
    }
}
