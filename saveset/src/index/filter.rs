//! A blocked Bloom filter over chunk ids: every probe of an id falls in one 64-byte block (a
//! cache line), so a lookup reads one block, from memory or, for a run whose filter does not fit
//! the budget's share, from the run's file (the page cache). Blocks follow the ids' order (an
//! id's block is its prefix scaled to the block count), so a run writes its filter as a stream
//! beside its sorted entries and never holds it whole, and ids looked up in sorted order read
//! each block once. Each block is stored with a checksum, checked whenever it is read. Chunk ids
//! are keyed hashes, uniform and unknown to an attacker, so their own bytes are the hashes.

use std::fs::File;
use std::os::unix::fs::FileExt;

use crate::manifest::ChunkId;

/// Bits per id: about 0.4% false positives in 512-bit blocks.
const BITS_PER_ID: u64 = 12;
/// Probes per id: near the optimum for 12 bits per id in 512-bit blocks.
const PROBES: u32 = 8;
/// Bytes of one block's bits.
const BLOCK: usize = 64;
const SUM: usize = 8;
/// Bytes of one block on disk: its bits, then the first 8 bytes of their blake3.
pub(crate) const RECORD: usize = BLOCK + SUM;
/// Bytes written at once while a filter is streamed out.
const WRITE_PIECE: usize = (64 << 10) / RECORD * RECORD;

pub(crate) type Block = [u64; BLOCK / 8];

/// Blocks for a run of `entries` ids (at least one).
pub(crate) fn blocks_for(entries: u64) -> u64 {
    entries.saturating_mul(BITS_PER_ID).div_ceil(BLOCK as u64 * 8).max(1)
}

/// The block of `id` among `blocks`: the id's first 8 bytes scaled to the count, so that ids in
/// ascending order go to blocks in ascending order.
pub(crate) fn block_of(id: &ChunkId, blocks: u64) -> u64 {
    let prefix = u64::from_be_bytes(id.0[..8].try_into().expect("8 bytes"));
    u64::try_from((u128::from(prefix) * u128::from(blocks)) >> 64).expect("below blocks")
}

/// The bits of `id` in its block: 9-bit fields of its bytes 8..24.
fn bits(id: &ChunkId) -> impl Iterator<Item = usize> {
    let h = u128::from_le_bytes(id.0[8..24].try_into().expect("16 bytes"));
    (0..PROBES).map(move |i| ((h >> (9 * i)) & 511) as usize)
}

fn set(block: &mut Block, id: &ChunkId) {
    for b in bits(id) {
        block[b / 64] |= 1 << (b % 64);
    }
}

pub(crate) fn may_contain(block: &Block, id: &ChunkId) -> bool {
    bits(id).all(|b| block[b / 64] & (1 << (b % 64)) != 0)
}

fn encode(block: &Block, out: &mut Vec<u8>) {
    let at = out.len();
    for w in block {
        out.extend_from_slice(&w.to_le_bytes());
    }
    let sum = blake3::hash(&out[at..]);
    out.extend_from_slice(&sum.as_bytes()[..SUM]);
}

/// A block from its record, if its checksum holds.
fn decode(record: &[u8]) -> Option<Block> {
    let (bits, sum) = record.split_at(BLOCK);
    if blake3::hash(bits).as_bytes()[..SUM] != *sum {
        return None;
    }
    let mut block = [0u64; BLOCK / 8];
    for (w, b) in block.iter_mut().zip(bits.chunks_exact(8)) {
        *w = u64::from_le_bytes(b.try_into().expect("8 bytes"));
    }
    Some(block)
}

/// Builds a filter of ids pushed in ascending order and writes it at `at` in a file, a piece at
/// a time: it holds one block and one piece, however many ids it covers.
pub(crate) struct FilterWriter {
    blocks: u64,
    at: u64,
    /// Block `current` is being filled; blocks before it are in `out` or written.
    current: u64,
    block: Block,
    out: Vec<u8>,
}

impl FilterWriter {
    pub(crate) fn new(blocks: u64, at: u64) -> FilterWriter {
        FilterWriter {
            blocks,
            at,
            current: 0,
            block: [0; BLOCK / 8],
            out: Vec::with_capacity(WRITE_PIECE),
        }
    }

    pub(crate) fn blocks(&self) -> u64 {
        self.blocks
    }

    /// Adds `id`, no smaller than the ids before it.
    pub(crate) fn insert(&mut self, file: &File, id: &ChunkId) -> std::io::Result<()> {
        let b = block_of(id, self.blocks);
        debug_assert!(b >= self.current, "ids in ascending order");
        while self.current < b {
            self.next_block(file)?;
        }
        set(&mut self.block, id);
        Ok(())
    }

    fn next_block(&mut self, file: &File) -> std::io::Result<()> {
        encode(&self.block, &mut self.out);
        self.block = [0; BLOCK / 8];
        self.current += 1;
        if self.out.len() >= WRITE_PIECE {
            self.flush(file)?;
        }
        Ok(())
    }

    fn flush(&mut self, file: &File) -> std::io::Result<()> {
        file.write_all_at(&self.out, self.at)?;
        self.at += self.out.len() as u64;
        self.out.clear();
        Ok(())
    }

    /// Writes the last blocks.
    pub(crate) fn finish(mut self, file: &File) -> std::io::Result<()> {
        while self.current < self.blocks {
            self.next_block(file)?;
        }
        self.flush(file)
    }
}

/// Appends to `out` the `count` blocks from block `first` of a filter at `at`, checking each
/// (read in 64 KiB pieces, straight into `out`); the error names the first that does not check
/// out.
pub(crate) fn read_range(
    file: &File,
    at: u64,
    first: u64,
    count: u64,
    out: &mut Vec<Block>,
) -> Result<(), String> {
    let mut buf = vec![
        0u8;
        WRITE_PIECE
            .min(usize::try_from(count).unwrap_or(usize::MAX).saturating_mul(RECORD))
    ];
    let mut done = 0u64;
    while done < count {
        let k = usize::try_from((count - done).min((buf.len() / RECORD) as u64)).expect("k");
        let piece = &mut buf[..k * RECORD];
        let b = first + done;
        file.read_exact_at(piece, at + b * RECORD as u64).map_err(|e| e.to_string())?;
        for (i, r) in piece.chunks_exact(RECORD).enumerate() {
            let bad = || format!("filter block {}: checksum mismatch", b + i as u64);
            out.push(decode(r).ok_or_else(bad)?);
        }
        done += k as u64;
    }
    Ok(())
}

/// Reads block `b` of a filter at `at` and checks it.
pub(crate) fn read_block(file: &File, at: u64, b: u64) -> Result<Block, String> {
    let mut r = [0u8; RECORD];
    file.read_exact_at(&mut r, at + b * RECORD as u64).map_err(|e| e.to_string())?;
    decode(&r).ok_or_else(|| format!("filter block {b}: checksum mismatch"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u64) -> ChunkId {
        ChunkId(*blake3::hash(&n.to_le_bytes()).as_bytes())
    }

    /// A filter of `ids` written to a temp file, and the file.
    fn written(ids: &mut [ChunkId], at: u64) -> (File, u64) {
        ids.sort_unstable();
        let file = tempfile::tempfile().expect("tempfile");
        let mut w = FilterWriter::new(blocks_for(ids.len() as u64), at);
        for id in ids.iter() {
            w.insert(&file, id).expect("insert");
        }
        let blocks = w.blocks();
        w.finish(&file).expect("finish");
        (file, blocks)
    }

    #[test]
    fn inserted_ids_are_always_found_and_others_rarely() {
        let mut ids: Vec<ChunkId> = (0..20_000).map(id).collect();
        let (file, blocks) = written(&mut ids, 100);
        let mut all = Vec::new();
        read_range(&file, 100, 0, blocks, &mut all).expect("read");
        assert_eq!(all.len() as u64, blocks);
        assert_eq!(blocks, 20_000 * 12 / 512 + 1, "12 bits per id, rounded up to a block");
        for id in &ids {
            let b = block_of(id, blocks);
            assert!(may_contain(&all[b as usize], id));
            assert_eq!(read_block(&file, 100, b).expect("block"), all[b as usize]);
        }
        let false_pos = (20_000..220_000)
            .map(id)
            .filter(|id| may_contain(&all[block_of(id, blocks) as usize], id))
            .count();
        assert!(false_pos < 2_000, "{false_pos} false positives in 200k at 12 bits per id");
    }

    #[test]
    fn blocks_follow_the_order_of_the_ids_and_cover_them_all() {
        let mut ids: Vec<ChunkId> = (0..5_000).map(id).collect();
        ids.sort_unstable();
        for blocks in [1, 7, 117, 1 << 20] {
            let at: Vec<u64> = ids.iter().map(|id| block_of(id, blocks)).collect();
            assert!(at.windows(2).all(|w| w[0] <= w[1]), "{blocks} blocks: in order");
            assert!(at.iter().all(|&b| b < blocks));
        }
        assert_eq!(block_of(&ChunkId([0xff; 32]), 117), 116);
        assert_eq!(block_of(&ChunkId([0; 32]), 117), 0);
    }

    #[test]
    fn a_damaged_block_is_found_when_read() {
        let mut ids: Vec<ChunkId> = (0..2_000).map(id).collect();
        let (file, blocks) = written(&mut ids, 0);
        let mut r = [0u8; 1];
        file.read_exact_at(&mut r, RECORD as u64 * 3 + 5).expect("read");
        file.write_all_at(&[r[0] ^ 1], RECORD as u64 * 3 + 5).expect("flip");
        assert!(read_block(&file, 0, 3).is_err());
        assert!(read_block(&file, 0, 4).is_ok());
        let err = read_range(&file, 0, 0, blocks, &mut Vec::new()).expect_err("damaged");
        assert!(err.contains("filter block 3"), "{err}");
    }
}
