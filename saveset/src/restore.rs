//! Restoring a volume manifest to a file or block device: bit for bit, holes left unallocated
//! on regular files. Refuses a target that holds data unless forced.

use std::fs::{self, File, OpenOptions};
use std::io::ErrorKind;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::Path;

use crate::error::{Error, IoContext, Result};
use crate::manifest::{Manifest, ManifestId, VolumeManifest};
use crate::repo::{runs, Repository};

/// At most this many bytes of a pack are fetched by one read.
const READ_RUN: u64 = 8 << 20;

/// What a restore wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RestoreStats {
    /// Logical size of the restored volume.
    pub size: u64,
    /// Bytes of data written (holes on a regular file are not written).
    pub bytes_written: u64,
}

impl Repository {
    /// Restores the volume manifest `id` to `target`; see [`Repository::restore_manifest`].
    pub fn restore_volume(
        &self,
        id: ManifestId,
        target: &Path,
        force: bool,
    ) -> Result<RestoreStats> {
        match self.load_manifest(id)? {
            Manifest::Volume(m) => self.restore_manifest(&m, target, force),
            Manifest::Backup(_) => Err(Error::Damaged {
                what: format!("manifest {id}"),
                reason: "is a backup manifest, not a volume manifest".into(),
            }),
        }
    }

    /// Writes the volume back to `target`, a regular file (created if absent, left sparse) or a
    /// block device (holes written as zeros). A non-empty file, or any block device, is
    /// refused with [`Error::TargetNotEmpty`] unless `force`.
    pub fn restore_manifest(
        &self,
        manifest: &VolumeManifest,
        target: &Path,
        force: bool,
    ) -> Result<RestoreStats> {
        let (file, sparse) = open_target(target, manifest.size, force)?;
        let mut stats = RestoreStats { size: manifest.size, bytes_written: 0 };
        let zeros = vec![0u8; manifest.chunk_size as usize];
        // Chunks with data, in volume order, read in runs of neighbours in one pack.
        let mut data_chunks = Vec::new();
        for (i, chunk) in manifest.chunks.iter().enumerate() {
            let Some(id) = chunk else {
                if !sparse {
                    let (off, len) = manifest.extent(i);
                    file.write_all_at(&zeros[..len], off).ctx("write", target)?;
                }
                continue;
            };
            let loc = self.index.get(id).copied().ok_or_else(|| Error::Damaged {
                what: format!("chunk {id}"),
                reason: "not in any index".into(),
            })?;
            data_chunks.push((i, *id, loc));
        }
        let locs: Vec<_> = data_chunks.iter().map(|&(_, _, loc)| loc).collect();
        for run in runs(&locs, 0, READ_RUN) {
            let first = locs[run.start];
            let last = locs[run.end - 1];
            let bytes =
                self.read_pack(first.pack, first.offset..last.offset + u64::from(last.len))?;
            for &(i, id, loc) in &data_chunks[run] {
                let at = usize::try_from(loc.offset - first.offset).expect("inside the run");
                let blob = &bytes[at..at + loc.len as usize];
                let data = self.decode_chunk(id, blob).map_err(|reason| Error::Damaged {
                    what: format!(
                        "chunk {id} in pack {} at offset {}",
                        self.pack_path(loc.pack).display(),
                        loc.offset
                    ),
                    reason: reason.into(),
                })?;
                let (off, len) = manifest.extent(i);
                if data.len() != len {
                    return Err(Error::Damaged {
                        what: format!("chunk {id}"),
                        reason: format!("{} bytes where the manifest expects {len}", data.len()),
                    });
                }
                file.write_all_at(&data, off).ctx("write", target)?;
                stats.bytes_written += len as u64;
            }
        }
        file.sync_all().ctx("fsync", target)?;
        Ok(stats)
    }
}

/// Opens the target, sized and empty; `true` if it is a regular file (holes stay holes).
fn open_target(target: &Path, size: u64, force: bool) -> Result<(File, bool)> {
    let refuse = || Err(Error::TargetNotEmpty { path: target.to_owned() });
    match fs::metadata(target) {
        Err(e) if e.kind() == ErrorKind::NotFound => {
            let f = OpenOptions::new().write(true).create_new(true).open(target);
            let f = f.ctx("create", target)?;
            f.set_len(size).ctx("truncate", target)?;
            Ok((f, true))
        }
        Err(e) => Err(e).ctx("stat", target),
        Ok(m) if m.file_type().is_block_device() => {
            if !force {
                return refuse();
            }
            Ok((OpenOptions::new().write(true).open(target).ctx("open", target)?, false))
        }
        Ok(m) if m.is_file() => {
            if m.len() > 0 && !force {
                return refuse();
            }
            let f = OpenOptions::new().write(true).open(target).ctx("open", target)?;
            // Emptying first makes every hole in the restored volume a real hole.
            f.set_len(0).ctx("truncate", target)?;
            f.set_len(size).ctx("truncate", target)?;
            Ok((f, true))
        }
        Ok(_) => Err(Error::Io {
            op: "restore to",
            path: target.to_owned(),
            source: std::io::Error::new(ErrorKind::InvalidInput, "not a file or block device"),
        }),
    }
}
