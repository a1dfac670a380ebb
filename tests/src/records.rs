//! The causal workload's on-disk records: fixed 64-byte slots written straight into a LUN, as a
//! database writes its pages. A record on server B names the record on server A written (and
//! synced) before it; a consistent backup never holds a B record whose A record is missing.

use std::fs::File;
use std::io::Read;
use std::path::Path;

pub const RECORD: usize = 64;
const MAGIC: u32 = 0x5354_504e; // "STPN"

/// One record: its own sequence number and the sequence number of the record it names on the
/// previous server in the chain (`u64::MAX` for the first server).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    pub seq: u64,
    pub names: u64,
}

impl Record {
    pub fn encode(&self) -> [u8; RECORD] {
        let mut out = [0u8; RECORD];
        out[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        out[4..12].copy_from_slice(&self.seq.to_le_bytes());
        out[12..20].copy_from_slice(&self.names.to_le_bytes());
        let sum = checksum(&out[..56]);
        out[56..64].copy_from_slice(&sum.to_le_bytes());
        out
    }

    /// A whole, valid record, or `None` for an empty or torn slot.
    pub fn decode(slot: &[u8]) -> Option<Record> {
        if slot.len() != RECORD || slot[0..4] != MAGIC.to_le_bytes() {
            return None;
        }
        let sum = u64::from_le_bytes(slot[56..64].try_into().ok()?);
        if sum != checksum(&slot[..56]) {
            return None;
        }
        Some(Record {
            seq: u64::from_le_bytes(slot[4..12].try_into().ok()?),
            names: u64::from_le_bytes(slot[12..20].try_into().ok()?),
        })
    }
}

fn checksum(bytes: &[u8]) -> u64 {
    // FNV-1a: enough to tell a whole record from a torn or empty slot.
    bytes
        .iter()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// Every valid record in an image, by slot.
pub fn read_records(path: &Path) -> std::io::Result<Vec<Record>> {
    let mut bytes = Vec::new();
    File::open(path)?.read_to_end(&mut bytes)?;
    Ok(bytes.chunks_exact(RECORD).filter_map(Record::decode).collect())
}

/// Checks the chain `images[0] <- images[1] <- ...`: every record on image i+1 must find the
/// record it names on image i. Returns how many links were checked, or the first broken one.
pub fn check_chain(images: &[Vec<Record>]) -> Result<usize, String> {
    let mut checked = 0;
    for pair in images.windows(2) {
        let earlier: std::collections::HashSet<u64> = pair[0].iter().map(|r| r.seq).collect();
        for r in &pair[1] {
            if !earlier.contains(&r.names) {
                return Err(format!("record {} names record {} which is missing", r.seq, r.names));
            }
            checked += 1;
        }
    }
    Ok(checked)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_torn_ones_are_rejected() {
        let r = Record { seq: 7, names: 6 };
        let mut bytes = r.encode();
        assert_eq!(Record::decode(&bytes), Some(r));
        bytes[5] ^= 1;
        assert_eq!(Record::decode(&bytes), None);
        assert_eq!(Record::decode(&[0u8; RECORD]), None);
    }

    #[test]
    fn a_missing_referent_is_reported() {
        let a = vec![Record { seq: 1, names: u64::MAX }];
        let b = vec![Record { seq: 1, names: 1 }, Record { seq: 2, names: 2 }];
        assert_eq!(check_chain(&[a.clone(), b[..1].to_vec()]), Ok(1));
        assert!(check_chain(&[a, b]).unwrap_err().contains("names record 2"));
    }
}
