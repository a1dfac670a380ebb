//! The extent-list comparison and the widening to chunks, without IO.

#![allow(clippy::single_range_in_vec_init)] // one changed range is the common answer

use super::*;

/// An extent `[logical, logical + length)` at `physical`.
fn ext(logical: u64, physical: u64, length: u64) -> FiemapExtent {
    FiemapExtent { logical, physical, length, flags: 0 }
}

fn flagged(mut e: FiemapExtent, flags: u32) -> FiemapExtent {
    e.flags = flags;
    e
}

fn check(
    size: u64,
    base: &[FiemapExtent],
    new: &[FiemapExtent],
) -> std::result::Result<Vec<Range<u64>>, String> {
    compare_extents(size, base.iter().copied().map(Ok), new.iter().copied().map(Ok))
}

#[test]
fn shared_extents_are_unchanged() {
    let same = [ext(0, 1 << 20, 4096 * 4), ext(4096 * 8, 2 << 20, 4096)];
    assert_eq!(check(4096 * 10, &same, &same), Ok(vec![]));
}

#[test]
fn an_extent_split_differently_in_each_file_is_still_shared() {
    let base = [ext(0, 1 << 20, 8192)];
    let new = [ext(0, 1 << 20, 4096), ext(4096, (1 << 20) + 4096, 4096)];
    assert_eq!(check(8192, &base, &new), Ok(vec![]));
}

#[test]
fn a_rewritten_block_moves_and_is_changed() {
    let base = [ext(0, 1 << 20, 4096 * 4)];
    let new = [ext(0, 1 << 20, 4096), ext(4096, 9 << 20, 4096), ext(8192, (1 << 20) + 8192, 8192)];
    assert_eq!(check(4096 * 4, &base, &new), Ok(vec![4096..8192]));
}

#[test]
fn the_same_address_at_another_offset_is_changed() {
    // Data moved within the file: the bytes at each offset differ.
    let base = [ext(0, 1 << 20, 4096), ext(4096, 2 << 20, 4096)];
    let new = [ext(0, 2 << 20, 4096), ext(4096, 1 << 20, 4096)];
    assert_eq!(check(8192, &base, &new), Ok(vec![0..8192]));
}

#[test]
fn holes_in_both_are_unchanged_and_hole_against_data_is_changed() {
    let base = [ext(4096, 1 << 20, 4096)];
    let new = [ext(4096, 1 << 20, 4096), ext(12288, 3 << 20, 4096)];
    // 0..4096 hole in both; 8192..12288 hole in both; 12288.. data in new only; then a hole in
    // the base and past the new file's last extent: unchanged.
    assert_eq!(check(16384 + 4096, &base, &new), Ok(vec![12288..16384]));
    assert_eq!(check(16384, &new, &base), Ok(vec![12288..16384]));
}

#[test]
fn untrusted_flags_are_never_shared() {
    for flags in [
        ff::UNKNOWN,
        ff::DELALLOC | ff::UNKNOWN,
        ff::ENCODED,
        ff::NOT_ALIGNED,
        ff::DATA_INLINE,
        ff::DATA_TAIL,
        ff::DATA_ENCRYPTED,
    ] {
        let base = [ext(0, 1 << 20, 8192)];
        let new = [flagged(ext(0, 1 << 20, 8192), flags)];
        assert_eq!(check(8192, &base, &new), Ok(vec![0..8192]), "flags {flags:#x}");
        assert_eq!(check(8192, &new, &base), Ok(vec![0..8192]), "flags {flags:#x}");
    }
    // Shared, last and merged say nothing against a proof.
    let new = [flagged(ext(0, 1 << 20, 8192), ff::SHARED | ff::LAST | ff::MERGED)];
    assert_eq!(check(8192, &[ext(0, 1 << 20, 8192)], &new), Ok(vec![]));
}

#[test]
fn written_against_unwritten_at_one_address_is_changed() {
    let base = [flagged(ext(0, 1 << 20, 8192), ff::UNWRITTEN)];
    let new = [ext(0, 1 << 20, 8192)];
    assert_eq!(check(8192, &base, &new), Ok(vec![0..8192]));
    assert_eq!(check(8192, &base, &base), Ok(vec![]));
}

#[test]
fn partial_overlaps_mark_only_what_differs() {
    // base: one extent 0..16K; new: 0..6K shared, 6K..10K elsewhere, 10K..16K shared.
    let base = [ext(0, 1 << 20, 16384)];
    let new =
        [ext(0, 1 << 20, 6144), ext(6144, 7 << 20, 4096), ext(10240, (1 << 20) + 10240, 6144)];
    assert_eq!(check(16384, &base, &new), Ok(vec![6144..10240]));
}

#[test]
fn adjacent_changes_merge_and_the_size_bounds_the_map() {
    let base = [ext(0, 1 << 20, 4096), ext(4096, 2 << 20, 4096)];
    let new = [ext(0, 5 << 20, 4096), ext(4096, 6 << 20, 1 << 30)];
    assert_eq!(check(12288, &base, &new), Ok(vec![0..12288]));
}

#[test]
fn overlapping_or_unordered_extents_are_refused() {
    let bad = [ext(4096, 1 << 20, 8192), ext(8192, 2 << 20, 4096)];
    let err = check(16384, &bad, &bad).unwrap_err();
    assert!(err.contains("out of order or overlapping"), "{err}");
}

#[test]
fn an_error_from_the_kernel_makes_the_map_unknown() {
    let failing = vec![Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP))];
    let err = compare_extents(4096, failing, vec![Ok(ext(0, 1 << 20, 4096))]).unwrap_err();
    assert!(err.starts_with("base: fiemap"), "{err}");
}

#[test]
fn widening_to_chunks_rounds_out_and_merges() {
    let map = ChangeMap::Ranges {
        source: MapSource::Fiemap,
        ranges: vec![1..2, 4095..4097, 10000..12288, 12288..12289, 40960..40961],
    };
    // Bytes 1..2 and 4095..4097 touch chunks 0 and 1; 10000..12288 chunk 2; 12288..12289
    // chunk 3: adjacent, one range. 40960..40961 is chunk 10.
    assert_eq!(map.chunk_ranges(4096), Some(vec![0..4, 10..11]));
    assert_eq!(map.bytes(), 1 + 2 + 2288 + 1 + 1);
    assert_eq!(ChangeMap::Unknown("x".into()).chunk_ranges(4096), None);
    assert_eq!(
        ChangeMap::Ranges { source: MapSource::Fiemap, ranges: vec![] }.chunk_ranges(4096),
        Some(vec![])
    );
    assert_eq!(map.describe(), "fiemap: 5 ranges, 2293 bytes");
    // The source is named: a qcow2 map never says fiemap.
    let qcow2 = ChangeMap::Ranges { source: MapSource::Qcow2, ranges: vec![0..65536] };
    assert_eq!(qcow2.describe(), "qcow2: 1 ranges, 65536 bytes");
    let thin = ChangeMap::Ranges {
        source: MapSource::LvmThin,
        ranges: vec![0..65536, 1 << 20..(1 << 20) + 4096],
    };
    assert_eq!(thin.describe(), "lvm-thin: 2 ranges, 69632 bytes");
}
