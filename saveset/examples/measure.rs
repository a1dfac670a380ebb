//! Chunk-size measurement for FORMAT.md: full backup of IMG, then incremental of its mutated
//! twin, for each fixed chunk size, in fresh repositories. Not a benchmark against peers.
//!
//! `cargo run -p stillpoint-saveset --example measure -- IMG MUT [KiB...]`

use std::path::Path;
use std::time::Instant;

use stillpoint_saveset::{InitOptions, KdfParams, Repository, Secret, VolumeMeta};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (img, mutated) = (Path::new(&args[0]), Path::new(&args[1]));
    let sizes: Vec<u32> = if args.len() > 2 {
        args[2..].iter().map(|s| s.parse().expect("KiB")).collect()
    } else {
        vec![4, 16, 64]
    };
    let logical = std::fs::metadata(img).expect("image").len() as f64;
    println!(
        "chunk  full_s  full_MB/s  full_stored_MB  incr_s  incr_MB/s  incr_added_MB  index_MB"
    );
    for kib in sizes {
        let dir = std::env::temp_dir().join(format!("saveset-measure-{kib}"));
        let _ = std::fs::remove_dir_all(&dir);
        let opts = InitOptions {
            chunk_size: kib * 1024,
            kdf: KdfParams { m_cost_kib: 8 * 1024, t_cost: 1, p_cost: 1 },
            ..InitOptions::default()
        };
        let secret = Secret::passphrase("measure");
        let mut repo = Repository::init_with(&dir, &secret, opts).expect("init");
        let meta =
            |v: &str| VolumeMeta { backup: v.into(), server: "s".into(), volume: "v".into() };
        let t = Instant::now();
        let full = repo.backup_volume(img, meta("full"), &mut |_| {}).expect("full");
        let full_s = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let incr = repo.backup_volume(mutated, meta("incr"), &mut |_| {}).expect("incr");
        let incr_s = t.elapsed().as_secs_f64();
        let index_mb = dir_size(&dir.join("index")) as f64 / 1e6;
        println!(
            "{kib:>3}KiB {full_s:>7.2} {:>10.0} {:>15.1} {incr_s:>7.2} {:>10.0} {:>14.2} {index_mb:>9.2}",
            logical / full_s / 1e6,
            full.stats.bytes_stored as f64 / 1e6,
            logical / incr_s / 1e6,
            incr.stats.bytes_stored as f64 / 1e6,
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}

fn dir_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .expect("dir")
        .map(|e| e.expect("entry").metadata().expect("stat").len())
        .sum()
}
