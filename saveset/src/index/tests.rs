//! The index cache on a real directory: spills, merges, reopening, damaged and foreign runs,
//! the exclusion rule, and the external sort.

use super::*;

fn id(n: u64) -> ChunkId {
    ChunkId(*blake3::hash(&n.to_le_bytes()).as_bytes())
}

fn pack(n: u64) -> PackId {
    PackId(*blake3::hash(format!("pack {n}").as_bytes()).as_bytes())
}

/// Pack `p` holds chunks `p*100 .. p*100+100`, chunk `k` at offset `k * 10`.
fn entries(p: u64) -> Vec<(ChunkId, u64, u32)> {
    (0..100).map(|k| (id(p * 100 + k), k * 10, 10)).collect()
}

const TAG: [u8; 16] = [7; 16];
/// A budget whose in-memory table holds 64 entries: every pack spills.
const TINY: u64 = 64 << 10;

/// An index in `dir` at `budget` holding packs `0..packs` (some spilled, merged, as the budget
/// makes them).
fn filled(dir: &Path, budget: u64, packs: u64) -> Index {
    let index = Index::open(Some(dir), TAG, budget).expect("open");
    for p in 0..packs {
        index.add_pack(pack(p), entries(p)).expect("add");
    }
    index
}

fn check_all(index: &Index, packs: u64) {
    let ids: Vec<ChunkId> = (0..packs * 100).map(id).collect();
    let got = index.get_many(&ids);
    for (n, loc) in got.into_iter().enumerate() {
        let n = n as u64;
        let want = ChunkLoc { pack: pack(n / 100), offset: (n % 100) * 10, len: 10 };
        assert_eq!(loc, Some(want), "chunk {n}");
    }
    for n in packs * 100..packs * 100 + 1000 {
        assert!(!index.contains_key(&id(n)), "chunk {n} was never added");
    }
}

#[test]
fn a_tiny_budget_spills_and_merges_and_every_lookup_still_answers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let index = Index::open(Some(dir.path()), TAG, TINY).expect("open");
    for p in 0..40 {
        index.add_pack(pack(p), entries(p)).expect("add");
        assert!(index.run_count() <= MAX_RUNS, "merged once past the limit");
    }
    index.sync().expect("sync");
    assert!(index.run_count() > 1 && index.run_count() <= MAX_RUNS);
    check_all(&index, 40);
    assert!((0..40).all(|p| index.has_pack(&pack(p))));
    assert!(index.memory() <= TINY, "{} bytes in memory", index.memory());
    // Lookups one at a time agree with the batch.
    assert!(index.contains_key(&id(1234)));
}

#[test]
fn a_sorted_lookup_answers_as_lone_lookups_do_for_ids_in_any_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let index = filled(dir.path(), TINY, 30);
    // A chunk in two packs, one of them excluded: the rule of `get` holds for the cursor too.
    index.add_pack(pack(99), vec![(id(5), 0, 10), (id(2_000_000), 0, 10)]).expect("add");
    index.set_excluded(|p| *p == pack(0));
    index.sync().expect("sync");
    assert!(index.run_count() > 1, "several runs, so several block caches");
    // Present, absent and repeated ids, in id order as a restore asks, then unsorted.
    let mut ids: Vec<ChunkId> =
        (0..3200).chain(0..50).chain([2_000_000, 3_000_000]).map(id).collect();
    ids.sort_unstable();
    let mut lookup = index.sorted();
    let sorted: Vec<Option<ChunkLoc>> = ids.iter().map(|i| lookup.get(i)).collect();
    drop(lookup);
    for (i, got) in ids.iter().zip(&sorted) {
        assert_eq!(*got, index.get(i), "{i}");
    }
    assert_eq!(sorted.iter().filter(|l| l.is_none()).count(), 200 + 1, "absent: 3000.. and one");
    assert_eq!(index.get(&id(5)).map(|l| l.pack), Some(pack(99)), "not the excluded pack");
    let mut lookup = index.sorted();
    for i in ids.iter().rev() {
        assert_eq!(lookup.get(i), index.get(i), "in reverse order too");
    }
    drop(lookup);
    // The dedup answer too: a chunk only in the excluded pack is not there to reference.
    let mut lookup = index.sorted();
    let sorted: Vec<bool> = ids.iter().map(|i| lookup.contains_key(i)).collect();
    drop(lookup);
    for (i, got) in ids.iter().zip(&sorted) {
        assert_eq!(*got, index.contains_key(i), "{i}");
    }
    assert!(!index.contains_key(&id(7)), "only in the excluded pack");
    assert!(index.contains_key(&id(5)), "in a pack that stays too");
}

#[test]
fn a_reopened_cache_holds_what_was_added_and_what_this_process_had_in_memory() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let index = Index::open(Some(dir.path()), TAG, DEFAULT_MEMORY_BUDGET).expect("open");
        for p in 0..5 {
            index.add_pack(pack(p), entries(p)).expect("add");
        }
        assert_eq!(index.run_count(), 0, "nothing spilled yet");
    } // dropped: the in-memory table goes to a run
    let index = Index::open(Some(dir.path()), TAG, DEFAULT_MEMORY_BUDGET).expect("reopen");
    assert_eq!(index.run_count(), 1);
    assert!((0..5).all(|p| index.has_pack(&pack(p))));
    check_all(&index, 5);
    let mut files: Vec<_> = std::fs::read_dir(dir.path().join(hex(&TAG)))
        .expect("list")
        .map(|e| e.expect("entry").path())
        .collect();
    files.retain(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("run-")));
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
    assert_eq!(mode(&files[0]), 0o600, "runs hold keyed ids and locations: owner only");
    assert_eq!(mode(&dir.path().join(hex(&TAG))), 0o700);
}

fn run_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(dir.join(hex(&TAG)))
        .expect("list")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("run-")))
        .collect();
    files.sort();
    files
}

/// Where the first block of entries of the run at `path` starts: after its header and filter.
fn blocks_at(path: &Path) -> usize {
    let bytes = std::fs::read(path).expect("read");
    let filter_blocks = u64::from_le_bytes(bytes[40..48].try_into().expect("8 bytes"));
    run::HEADER + usize::try_from(filter_blocks).expect("small") * filter::RECORD
}

/// Flips one bit of the file at `path`, at `at`.
fn flip(path: &Path, at: usize) {
    let mut bytes = std::fs::read(path).expect("read");
    bytes[at] ^= 1;
    std::fs::write(path, &bytes).expect("write");
}

#[test]
fn a_damaged_run_is_dropped_and_its_packs_are_no_longer_held() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let index = Index::open(Some(dir.path()), TAG, DEFAULT_MEMORY_BUDGET).expect("open");
        for p in 0..3 {
            index.add_pack(pack(p), entries(p)).expect("add");
        }
    }
    let run = &run_files(dir.path())[0];
    // A flipped byte in the tables (header checksum) and, separately, in a block.
    let mut bytes = std::fs::read(run).expect("read");
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(run, &bytes).expect("write");
    let index = Index::open(Some(dir.path()), TAG, DEFAULT_MEMORY_BUDGET).expect("reopen");
    assert_eq!(index.run_count(), 0, "damaged: not trusted");
    assert!(!index.has_pack(&pack(0)), "its packs are read from the repository again");
    assert!(run_files(dir.path()).is_empty(), "and the run is removed");
    // A block damaged where the header checksum cannot see it: found when read.
    for p in 0..3 {
        index.add_pack(pack(p), entries(p)).expect("add");
    }
    drop(index);
    let run = &run_files(dir.path())[0];
    flip(run, blocks_at(run) + 100);
    // A budget too small to keep the run in memory, so blocks are checked as they are read.
    let index = Index::open(Some(dir.path()), TAG, 64 << 10).expect("reopen");
    let all: Vec<ChunkId> = (0..300).map(id).collect();
    let found = index.get_many(&all).into_iter().filter(Option::is_some).count();
    assert!(found < 300, "the damaged block answers nothing");
    index.sync().expect("sync");
    assert_eq!(index.run_count(), 0);
    assert!(!index.has_pack(&pack(0)));
}

#[test]
fn the_in_memory_table_spills_before_a_pack_that_would_not_fit_so_it_stays_within_its_share() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A budget whose table holds 200 entries; packs of 70: the third does not fit beside two.
    let budget = 200 * 24 * MEM_ENTRY_COST;
    let index = Index::open(Some(dir.path()), TAG, budget).expect("open");
    let share = index.read().limits.mem_entries;
    assert_eq!(share, 200);
    for p in 0..20 {
        index.add_pack(pack(p), entries(p).into_iter().take(70)).expect("add");
        let inner = index.read();
        assert!(inner.mem_len() <= share, "pack {p}: {} entries held", inner.mem_len());
        assert!(inner.mem.capacity() <= share, "pack {p}: room for {}", inner.mem.capacity());
    }
    assert!(index.run_count() > 1, "spilled every two or three packs");
    let ids: Vec<ChunkId> = (0..20).flat_map(|p| (0..70).map(move |k| id(p * 100 + k))).collect();
    assert!(index.get_many(&ids).iter().all(Option::is_some), "every entry still found");
}

#[test]
fn a_merge_that_fails_on_a_damaged_input_leaves_the_other_inputs_answering() {
    let dir = tempfile::tempdir().expect("tempdir");
    let index = Index::open(Some(dir.path()), TAG, TINY).expect("open");
    index.add_pack(pack(0), entries(0)).expect("add");
    let first = run_files(dir.path());
    assert_eq!(first.len(), 1, "every pack spills at this budget");
    // A block of the first run damaged where its header checksum cannot see it (the run is too
    // large to be kept in memory at this budget, so nothing has read it yet).
    flip(&first[0], blocks_at(&first[0]) + 100);
    // The ninth run starts a merge of the six smallest, the damaged one among them: it fails.
    for p in 1..9 {
        index.add_pack(pack(p), entries(p)).expect("add");
    }
    assert_eq!(index.run_count(), 8, "the merge failed: the damaged run dropped, the rest kept");
    assert!(!index.has_pack(&pack(0)), "its pack's index file is read from the repository again");
    assert!(!first[0].exists(), "and its file removed");
    // The other inputs gave up their filters for the merge; they answer again all the same.
    let all: Vec<ChunkId> = (100..900).map(id).collect();
    for (n, loc) in (100..900u64).zip(index.get_many(&all)) {
        let want = ChunkLoc { pack: pack(n / 100), offset: (n % 100) * 10, len: 10 };
        assert_eq!(loc, Some(want), "chunk {n}");
    }
    for n in 100..900 {
        assert!(index.contains_key(&id(n)), "chunk {n}");
    }
}

#[test]
fn a_run_of_another_repository_is_never_used() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let index = Index::open(Some(dir.path()), [9; 16], DEFAULT_MEMORY_BUDGET).expect("open");
        index.add_pack(pack(0), entries(0)).expect("add");
    }
    // Copied into this repository's directory.
    let theirs = std::fs::read_dir(dir.path().join(hex(&[9u8; 16])))
        .expect("list")
        .map(|e| e.expect("entry").path())
        .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("run-")))
        .expect("a run");
    private_dir(&dir.path().join(hex(&TAG))).expect("mkdir");
    std::fs::copy(&theirs, dir.path().join(hex(&TAG)).join("run-copied")).expect("copy");
    let index = Index::open(Some(dir.path()), TAG, DEFAULT_MEMORY_BUDGET).expect("open");
    assert_eq!(index.run_count(), 0);
    assert!(!index.has_pack(&pack(0)));
    assert!(!index.contains_key(&id(5)));
}

#[test]
fn a_copy_in_a_pack_that_stays_wins_over_one_marked_for_deletion() {
    let dir = tempfile::tempdir().expect("tempdir");
    let index = Index::open(Some(dir.path()), TAG, TINY).expect("open");
    let shared = id(1_000_000);
    index.add_pack(pack(0), [(shared, 0, 10)]).expect("add");
    index.sync().expect("spill pack 0 to a run");
    index.add_pack(pack(1), [(shared, 50, 10)]).expect("add");
    let at = |p: u64, off: u64| Some(ChunkLoc { pack: pack(p), offset: off, len: 10 });
    assert_eq!(index.get_many(&[shared])[0], at(0, 0), "the first pack seen");
    index.set_excluded(|p| *p == pack(0));
    assert_eq!(index.get_many(&[shared])[0], at(1, 50));
    assert!(index.contains_key(&shared));
    index.set_excluded(|_| true);
    assert!(!index.contains_key(&shared), "only in excluded packs: store it again");
    assert!(index.get_many(&[shared])[0].is_some(), "but still readable");
}

#[test]
fn merges_drop_the_entries_of_packs_whose_index_file_is_gone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let index = Index::open(Some(dir.path()), TAG, TINY).expect("open");
    index.add_pack(pack(0), entries(0)).expect("add");
    index.set_gone(|p| *p == pack(0));
    for p in 1..80 {
        index.add_pack(pack(p), entries(p)).expect("add");
    }
    index.sync().expect("sync");
    assert!(!index.has_pack(&pack(0)), "merged away");
    assert!(index.packs().iter().all(|p| *p != pack(0)));
    assert!((1..80).all(|p| index.has_pack(&pack(p))));
}

#[test]
fn the_external_set_spills_under_its_budget_and_yields_each_id_once_in_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut set = ExternalSet::new(dir.path(), 32 * 1024);
    let mut want = Vec::new();
    for n in 0..20_000u64 {
        let i = id(n % 7_000);
        set.insert_id(i).expect("insert");
        want.push(i);
    }
    assert!(set.spilled() >= 2, "a 1024-id budget spills");
    assert_eq!(std::fs::read_dir(dir.path()).expect("list").count(), 0, "no run by name");
    want.sort_unstable();
    want.dedup();
    let got: Vec<ChunkId> =
        set.into_sorted_iter().expect("merge").map(|r| ChunkId(r.expect("read"))).collect();
    assert_eq!(got, want);
    let left = std::fs::read_dir(dir.path()).expect("list").count();
    assert_eq!(left, 0, "spilled runs are removed");
}

#[test]
fn an_external_sort_of_many_runs_merges_them_a_few_dozen_at_a_time() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut set = ExternalSet::new(dir.path(), 32 * 1024);
    // ~140 spills of 1024 distinct ids: several merges of 32 runs, one of the next level.
    let mut want: Vec<ChunkId> = (0..140_000u64).map(|n| id(n * 7919 % 140_000)).collect();
    for (k, i) in want.iter().enumerate() {
        set.insert_id(*i).expect("insert");
        assert!(set.spilled() < 64, "{} runs held after {k} ids", set.spilled());
    }
    // Runs are unlinked as soon as they are made: a process killed here leaves no file.
    let named = std::fs::read_dir(dir.path()).expect("list").count();
    assert_eq!(named, 0, "{} runs held, none by name", set.spilled());
    want.sort_unstable();
    let got: Vec<ChunkId> =
        set.into_sorted_iter().expect("merge").map(|r| ChunkId(r.expect("read"))).collect();
    assert_eq!(got.len(), want.len());
    assert!(got == want, "sorted, each once");
    assert_eq!(std::fs::read_dir(dir.path()).expect("list").count(), 0);
}

#[test]
fn runs_too_large_to_keep_in_memory_are_read_block_by_block_and_answer_the_same() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Runs of ~300 entries each, 40 packs: merged runs are far above the 16 KiB kept whole.
    let index = filled(dir.path(), TINY, 40);
    index.sync().expect("sync");
    drop(index);
    let index = Index::open(Some(dir.path()), TAG, TINY).expect("reopen");
    assert!(index.run_count() > 1);
    check_all(&index, 40);
    // One at a time too (each run's block numbers are its own).
    for n in (0..4000).step_by(37) {
        assert!(index.contains_key(&id(n)), "chunk {n}");
    }
}

#[test]
fn filters_beyond_their_share_are_read_from_the_run_file_and_answer_the_same() {
    let dir = tempfile::tempdir().expect("tempdir");
    let index = filled(dir.path(), TINY, 60);
    index.sync().expect("sync");
    let (in_memory, on_disk): (Vec<_>, Vec<_>) = {
        let inner = index.read();
        let share = inner.limits.filter_bytes;
        let held: u64 = inner.runs.iter().map(|l| l.run.filter_held()).sum();
        assert!(held <= share, "{held} bytes of filters held for a share of {share}");
        assert!(held + 64 > share, "{held} bytes of filters held: the share is used");
        inner.runs.iter().map(|l| l.run.filter_held() == l.run.filter_bytes()).partition(|&m| m)
    };
    assert!(!on_disk.is_empty(), "the largest runs' filters do not fit the share");
    assert!(!in_memory.is_empty(), "the smallest do");
    check_all(&index, 60);
    for n in (0..6000).step_by(13) {
        assert!(index.contains_key(&id(n)), "chunk {n}");
    }
    for n in 6000..8000 {
        assert!(!index.contains_key(&id(n)), "chunk {n} was never added");
    }
    assert!(index.memory() <= TINY, "{} bytes in memory", index.memory());
}

#[test]
fn a_damaged_filter_block_read_from_disk_drops_its_run_and_no_lookup_answers_wrong() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Dropped at once: its in-memory table goes to one run.
    let fill = || drop(filled(dir.path(), DEFAULT_MEMORY_BUDGET, 30));
    fill();
    let runs = run_files(dir.path());
    assert_eq!(runs.len(), 1, "one spill at drop");
    let blocks = ((blocks_at(&runs[0]) - run::HEADER) / filter::RECORD) as u64;
    // The last filter block flipped where the header checksum cannot see it. At this budget
    // the run holds only its filter's first blocks, so that one is read when a lookup needs it.
    flip(&runs[0], run::HEADER + (blocks as usize - 1) * filter::RECORD + 3);
    let index = Index::open(Some(dir.path()), TAG, TINY).expect("reopen");
    assert_eq!(index.run_count(), 1, "the header and tables check out");
    let held = index.read().runs[0].run.filter_held();
    assert!(held > 0 && held < blocks * 64, "{held} bytes of {} held", blocks * 64);
    assert!(index.contains_key(&id(0)), "id 0's block is held");
    let victim = (0..3000).find(|&n| filter::block_of(&id(n), blocks) == blocks - 1);
    let victim = victim.expect("an id in the last block");
    assert!(!index.contains_key(&id(victim)), "a damaged filter block answers nothing");
    assert!(!index.contains_key(&id(0)), "and its run is no longer used");
    index.sync().expect("sync");
    assert_eq!(index.run_count(), 0);
    assert!(!index.has_pack(&pack(0)), "its packs' index files are read again");
    // Held in memory instead, the filter is checked when it is read: the run is not used.
    drop(index);
    fill();
    let runs = run_files(dir.path());
    flip(&runs[0], run::HEADER + 7);
    let index = Index::open(Some(dir.path()), TAG, DEFAULT_MEMORY_BUDGET).expect("reopen");
    assert!(!index.contains_key(&id(5)));
    index.sync().expect("sync");
    assert_eq!(index.run_count(), 0);
    assert!(!index.has_pack(&pack(0)));
}
