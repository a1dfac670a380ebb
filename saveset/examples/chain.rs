//! How much a chain of daily backups adds, metadata apart from data: `chain IMG N FRACTION
//! [CLUSTER]` copies IMG (sparse) to `IMG.chain`, backs it up, then N times rewrites FRACTION of
//! its 4 KiB blocks in place (scattered, or in runs of CLUSTER blocks) and backs it up as the
//! child of the previous backup; prints per backup the bytes stored in packs and the metadata
//! added (chunk list pages and manifest), then the totals and the last restore's time. The
//! repository is in `IMG.chain-repo` (removed first). Passphrase "ops"; the chunk list as flat
//! format 2 lists would add 32 bytes per data chunk and a bit per chunk every backup, printed
//! for comparison.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use stillpoint_saveset::{InitOptions, KdfParams, Repository, Secret, VolumeMeta};

fn main() {
    let a: Vec<String> = std::env::args().skip(1).collect();
    let img = Path::new(&a[0]);
    let n: u64 = a[1].parse().expect("N");
    let fraction: f64 = a[2].parse().expect("FRACTION");
    let cluster: u64 = a.get(3).map_or(1, |c| c.parse().expect("CLUSTER"));
    let work = img.with_extension("chain");
    let repo_dir = img.with_extension("chain-repo");
    let _ = std::fs::remove_dir_all(&repo_dir);
    let ok = Command::new("cp").arg("--sparse=always").arg(img).arg(&work).status();
    assert!(ok.is_ok_and(|s| s.success()), "copy the image");
    let secret = Secret::passphrase("ops");
    let kdf = KdfParams { m_cost_kib: 8 * 1024, t_cost: 1, p_cost: 1 };
    let mut repo =
        Repository::init_with(&repo_dir, &secret, InitOptions { kdf, ..InitOptions::default() })
            .expect("init");
    let meta =
        |k: u64| VolumeMeta { backup: format!("b{k}"), server: "s".into(), volume: "v".into() };
    let first = repo.backup_volume(&work, meta(0), &mut |_| {}).expect("backup");
    let flat = first.stats.size.div_ceil(4096).div_ceil(8)
        + 32 * (first.stats.new_chunks + first.stats.reused_chunks);
    println!(
        "backup 0: stored {} B, metadata {} B (flat list: {flat} B)",
        first.stats.bytes_stored, first.stats.metadata_bytes
    );
    let f = OpenOptions::new().write(true).open(&work).expect("open");
    let blocks = first.stats.size / 4096;
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let (mut data, mut metadata) = (0u64, 0u64);
    let mut parent = first.id;
    for k in 1..=n {
        let runs = (blocks as f64 * fraction) as u64 / cluster;
        for _ in 0..runs {
            let at = next() % (blocks - cluster);
            let bytes: Vec<u8> = (0..4096 * cluster).map(|_| next() as u8).collect();
            f.write_all_at(&bytes, at * 4096).expect("write");
        }
        let t = Instant::now();
        let b =
            repo.backup_volume_child(&work, meta(k), Some(parent), &mut |_| {}).expect("backup");
        println!(
            "backup {k}: {:.2} s, stored {} B, metadata {} B",
            t.elapsed().as_secs_f64(),
            b.stats.bytes_stored,
            b.stats.metadata_bytes
        );
        data += b.stats.bytes_stored;
        metadata += b.stats.metadata_bytes;
        parent = b.id;
    }
    println!(
        "{n} backups: data {data} B, metadata {metadata} B; flat lists would add {} B",
        n * flat
    );
    let out = img.with_extension("chain-out");
    let t = Instant::now();
    repo.restore_volume(parent, &out, true).expect("restore");
    println!("restore of the last: {:.2} s", t.elapsed().as_secs_f64());
    let same = Command::new("cmp").arg(&work).arg(&out).status();
    println!("restore identical: {}", same.is_ok_and(|s| s.success()));
    let _ = std::fs::remove_file(&out);
    let _ = std::fs::remove_file(&work);
    let _ = std::fs::remove_dir_all(&repo_dir);
}
