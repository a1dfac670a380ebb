//! Backing up one volume (a file or block device, typically a snapshot): fixed-size chunks,
//! holes from SEEK_DATA/SEEK_HOLE and all-zero chunks, dedup against the index, packs, then the
//! manifest. Reads the source in one pass with a chunk-sized buffer; memory is the index only.

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::Path;

use stillpoint_core::sys::{next_data, next_hole};

use crate::error::{IoContext, Result};
use crate::manifest::{ChunkId, Manifest, ManifestId, VolumeManifest, VolumeMeta};
use crate::repo::{now_ms, PackWriter, Repository};

/// How far a backup has got, in logical bytes of the volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Progress {
    pub done: u64,
    pub total: u64,
}

/// What one volume backup read and stored.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackupStats {
    /// Logical size of the volume.
    pub size: u64,
    /// Bytes actually read (holes are skipped).
    pub bytes_read: u64,
    /// Chunks recorded as holes (unallocated or all zeros).
    pub hole_chunks: u64,
    /// Chunks already in the repository (or earlier in this backup).
    pub reused_chunks: u64,
    /// Chunks stored by this backup.
    pub new_chunks: u64,
    /// Bytes written to packs (compressed, sealed).
    pub bytes_stored: u64,
    /// Packs written.
    pub packs: u64,
}

/// The result of [`Repository::backup_volume`].
#[derive(Clone, Debug)]
pub struct VolumeBackup {
    pub id: ManifestId,
    pub manifest: VolumeManifest,
    pub stats: BackupStats,
}

impl Repository {
    /// Backs up `source` (a regular file or block device) and writes its volume manifest.
    ///
    /// Packs and their index files are durable before the manifest that references them is
    /// written, so a crash at any point leaves a valid repository, and a rerun reuses every
    /// chunk whose pack was completed. `progress` is called after every chunk.
    pub fn backup_volume(
        &mut self,
        source: &Path,
        meta: VolumeMeta,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<VolumeBackup> {
        self.refresh_index()?;
        let mut file = File::open(source).ctx("open", source)?;
        let size = file.seek(SeekFrom::End(0)).ctx("seek", source)?;
        let mut manifest = VolumeManifest {
            meta,
            size,
            chunk_size: self.chunk_size(),
            chunks: Vec::new(),
            created_unix_ms: 0,
        };
        let mut stats = BackupStats { size, ..BackupStats::default() };
        let mut pack = Some(self.new_pack()?);
        let result =
            self.copy_chunks(&file, source, &mut manifest, &mut stats, &mut pack, progress);
        let pack = pack.take().expect("copy_chunks leaves a pack");
        if let Err(e) = result {
            pack.discard();
            return Err(e);
        }
        if pack.is_empty() {
            pack.discard();
        } else {
            stats.packs += 1;
            self.finish_pack(pack)?;
        }
        manifest.created_unix_ms = now_ms();
        let id = self.write_manifest(&Manifest::Volume(manifest.clone()))?;
        tracing::debug!(manifest = %id, source = %source.display(), ?stats, "volume backed up");
        Ok(VolumeBackup { id, manifest, stats })
    }

    fn copy_chunks(
        &mut self,
        file: &File,
        source: &Path,
        manifest: &mut VolumeManifest,
        stats: &mut BackupStats,
        pack: &mut Option<PackWriter>,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<()> {
        let cs = u64::from(manifest.chunk_size);
        let n = manifest.size.div_ceil(cs);
        let mut extents = Extents { file, size: manifest.size, seg: None, supported: true };
        let mut buf = vec![0u8; manifest.chunk_size as usize];
        let mut zc = zstd::bulk::Compressor::new(self.zstd_level())
            .expect("a zstd level within 1..=22 is valid");
        manifest.chunks.reserve(usize::try_from(n).unwrap_or(0));
        for i in 0..n {
            let off = i * cs;
            let len = cs.min(manifest.size - off);
            let data = &mut buf[..len as usize];
            let entry = if !extents.has_data(off, off + len) {
                None
            } else {
                file.read_exact_at(data, off).ctx("read", source)?;
                stats.bytes_read += len;
                if is_zero(data) {
                    None
                } else {
                    let id = ChunkId(self.key.chunk_id(data));
                    let current = pack.as_mut().expect("a pack is open");
                    if self.index.contains_key(&id) || current.chunks.contains(&id) {
                        stats.reused_chunks += 1;
                    } else {
                        let blob = self.encode_chunk(&mut zc, id, data);
                        current.append(id, &blob)?;
                        stats.new_chunks += 1;
                        stats.bytes_stored += blob.len() as u64;
                        if current.len >= self.pack_size() {
                            let full = pack.replace(self.new_pack()?).expect("a pack is open");
                            self.finish_pack(full)?;
                            stats.packs += 1;
                        }
                    }
                    Some(id)
                }
            };
            if entry.is_none() {
                stats.hole_chunks += 1;
            }
            manifest.chunks.push(entry);
            progress(Progress { done: off + len, total: manifest.size });
        }
        Ok(())
    }
}

/// The source's data regions, from SEEK_DATA/SEEK_HOLE (everything is data where unsupported).
struct Extents<'a> {
    file: &'a File,
    size: u64,
    /// The data region at or after the last query: `[start, end)`.
    seg: Option<(u64, u64)>,
    supported: bool,
}

impl Extents<'_> {
    /// Whether any byte of `[off, end)` is allocated.
    fn has_data(&mut self, off: u64, end: u64) -> bool {
        if !self.supported {
            return true;
        }
        if self.seg.is_none_or(|(_, e)| e <= off) {
            self.seg = match next_data(self.file, off) {
                Ok(Some(start)) => {
                    let end = next_hole(self.file, start).ok().flatten().unwrap_or(self.size);
                    Some((start, end.max(start + 1)))
                }
                Ok(None) => Some((self.size, u64::MAX)),
                Err(_) => {
                    self.supported = false;
                    return true;
                }
            };
        }
        let (start, _) = self.seg.expect("just set");
        start < end
    }
}

fn is_zero(data: &[u8]) -> bool {
    // Eight bytes at a time; the compiler vectorizes this.
    let mut words = data.chunks_exact(8);
    words.all(|w| w == [0u8; 8]) && words.remainder().iter().all(|&b| b == 0)
}
