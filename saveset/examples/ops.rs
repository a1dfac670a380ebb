//! One repository operation per process, for timing and peak RSS (`/usr/bin/time -v`):
//! `ops init REPO`, `ops backup REPO IMG NAME`, `ops restore REPO MANIFEST_ID OUT`,
//! `ops verify REPO`. Passphrase "ops"; default KDF parameters.

use std::path::Path;
use std::time::Instant;

use stillpoint_saveset::{Repository, Secret, VolumeMeta};

fn main() {
    let a: Vec<String> = std::env::args().skip(1).collect();
    let secret = Secret::passphrase("ops");
    let repo_path = Path::new(&a[1]);
    let t = Instant::now();
    let dbg = std::env::var_os("SP_DEBUG").is_some();
    match a[0].as_str() {
        "init" => {
            Repository::init(repo_path, &secret).expect("init");
        }
        "backup" => {
            let mut repo = Repository::open(repo_path, &secret).expect("open");
            let meta = VolumeMeta { backup: a[3].clone(), server: "s".into(), volume: "v".into() };
            let b = repo.backup_volume(Path::new(&a[2]), meta, &mut |_| {}).expect("backup");
            let s = t.elapsed().as_secs_f64();
            println!("{} {s:.2} s {:.0} MB/s", b.id, b.stats.size as f64 / s / 1e6);
        }
        "restore" => {
            let repo = Repository::open(repo_path, &secret).expect("open");
            if dbg {
                eprintln!("open {:?}", t.elapsed());
            }
            if dbg {
                let t1 = Instant::now();
                let _ = repo.load_manifest(a[2].parse().expect("id")).expect("manifest");
                eprintln!("manifest load {:?}", t1.elapsed());
            }
            let st = repo
                .restore_volume(a[2].parse().expect("id"), Path::new(&a[3]), true)
                .expect("restore");
            let s = t.elapsed().as_secs_f64();
            println!(
                "restore {s:.2} s {:.0} MB/s, {} of {} data bytes reused",
                st.size as f64 / s / 1e6,
                st.bytes_reused,
                st.bytes_written
            );
        }
        "verify" => {
            let repo = Repository::open(repo_path, &secret).expect("open");
            if dbg {
                eprintln!("open {:?}", t.elapsed());
            }
            let r = repo.verify(true).expect("verify");
            let s = t.elapsed().as_secs_f64();
            println!("verify {s:.2} s ok={} chunks={}", r.is_ok(), r.chunks_read);
        }
        other => panic!("unknown op {other}"),
    }
}
