//! The saveset verbs (`repo init|backup`, `verify`, `restore`) run as the real binary against a
//! repository in a temp directory: exit codes, damage named by verify, byte-identical sparse
//! restores, refusals. The saveset format itself is tested in `saveset/`.

use std::fs::{self, File};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use stillpoint_saveset::{
    BackupArtifact, BackupManifest, Manifest, ManifestId, Repository, Secret,
};

const BIN: &str = env!("CARGO_BIN_EXE_backupctl");
const PASSPHRASE: &str = "correct horse battery staple";
const MIB: u64 = 1 << 20;

/// A temp directory with a passphrase file and the repository options pointing into it.
struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    /// A fixture with an initialized repository.
    fn new() -> Fixture {
        let f = Fixture::bare();
        f.ok(&["repo", "init"]);
        f
    }

    fn bare() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("pass"), format!("{PASSPHRASE}\n")).unwrap();
        fs::write(dir.path().join("wrong"), "not the passphrase\n").unwrap();
        Fixture { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn repo(&self) -> PathBuf {
        self.path("repo")
    }

    /// Runs backupctl with `--repo` and the passphrase file given by the environment.
    fn run(&self, args: &[&str]) -> Output {
        self.run_with(args, &self.path("pass"))
    }

    fn run_with(&self, args: &[&str], passphrase_file: &Path) -> Output {
        Command::new(BIN)
            .args(args)
            .env("STILLPOINT_REPO", self.repo())
            .env("STILLPOINT_REPO_PASSPHRASE_FILE", passphrase_file)
            .env_remove("STILLPOINT_REPO_KEY_FILE")
            .env_remove("STILLPOINT_BACKUP_ID")
            .env_remove("STILLPOINT_SERVER")
            .env_remove("STILLPOINT_VOLUME")
            .env_remove("STILLPOINT_SNAPSHOT")
            .output()
            .unwrap()
    }

    /// Runs and expects exit 0; returns stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        check_exit(&out, 0, args);
        String::from_utf8(out.stdout).unwrap()
    }

    /// `repo backup` of `image`; returns the volume manifest id from `--json`.
    fn backup(&self, backup: &str, server: &str, volume: &str, image: &Path) -> String {
        let image = image.to_str().unwrap();
        let args = [
            "repo", "backup", "--backup", backup, "--server", server, "--volume", volume, "--json",
        ];
        let out = self.ok(&[&args[..], &[image]].concat());
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["size"], serde_json::json!(fs::metadata(image).unwrap().len()), "{out}");
        v["manifest"].as_str().unwrap().to_owned()
    }

    /// Writes the backup manifest naming `volumes` and carrying `(server, quiescer, name,
    /// bytes)` artifacts, as the listener's seal does.
    fn finish_with(
        &self,
        backup: &str,
        volumes: &[&str],
        artifacts: &[(&str, &str, &str, &[u8])],
    ) -> String {
        let repo = Repository::open(&self.repo(), &Secret::passphrase(PASSPHRASE)).unwrap();
        let manifest = BackupManifest {
            backup: backup.into(),
            volumes: volumes.iter().map(|v| v.parse::<ManifestId>().unwrap()).collect(),
            cut: serde_json::json!({"servers": []}),
            created_unix_ms: 1,
            artifacts: artifacts
                .iter()
                .map(|(server, quiescer, name, bytes)| BackupArtifact {
                    server: server.to_string(),
                    quiescer: quiescer.to_string(),
                    name: name.to_string(),
                    bytes: bytes.to_vec(),
                })
                .collect(),
        };
        repo.write_manifest(&Manifest::Backup(manifest)).unwrap().to_string()
    }

    /// Writes the backup manifest naming `volumes`, as the listener does once every server's
    /// copy is in: what makes a backup complete.
    fn finish(&self, backup: &str, volumes: &[&str]) -> String {
        let repo = Repository::open(&self.repo(), &Secret::passphrase(PASSPHRASE)).unwrap();
        let manifest = BackupManifest {
            backup: backup.into(),
            volumes: volumes.iter().map(|v| v.parse::<ManifestId>().unwrap()).collect(),
            cut: serde_json::json!({"servers": []}),
            created_unix_ms: 1,
            artifacts: Vec::new(),
        };
        repo.write_manifest(&Manifest::Backup(manifest)).unwrap().to_string()
    }
}

fn check_exit(out: &Output, code: i32, args: &[&str]) {
    assert_eq!(
        out.status.code(),
        Some(code),
        "{args:?}\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// An 8 MiB sparse image: random data, text, an all-zero written block and large holes.
fn make_image(path: &Path, seed: u64) {
    let f = File::create(path).unwrap();
    f.set_len(8 * MIB).unwrap();
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let random: Vec<u8> = (0..300_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    f.write_all_at(&random, 4096).unwrap();
    let text: Vec<u8> =
        (0..2000).flat_map(|i| format!("line {i} seed {seed}\n").into_bytes()).collect();
    f.write_all_at(&text, 3 * MIB + 100).unwrap();
    f.write_all_at(&vec![0u8; 64 * 1024], 5 * MIB).unwrap();
    f.write_all_at(&random[..5000], 8 * MIB - 5000).unwrap();
}

fn allocated(path: &Path) -> u64 {
    fs::metadata(path).unwrap().blocks() * 512
}

fn assert_restored(restored: &Path, original: &Path) {
    let (a, b) = (fs::read(restored).unwrap(), fs::read(original).unwrap());
    assert!(a == b, "{} differs from {}", restored.display(), original.display());
    // Holes stay holes: only the data (~0.6 MiB of 8 MiB) is allocated, give or take blocks.
    assert!(
        allocated(restored) <= allocated(original) + 64 * 1024,
        "restored {} B allocated, original {} B",
        allocated(restored),
        allocated(original)
    );
    assert!(allocated(restored) < 2 * MIB, "{} B allocated", allocated(restored));
}

#[test]
fn verify_is_clean_after_a_backup() {
    let f = Fixture::new();
    make_image(&f.path("disk.img"), 1);
    let id = f.backup("b-1", "srv-a", "disk", &f.path("disk.img"));
    f.finish("b-1", &[&id]);
    let out = f.ok(&["verify", "b-1"]);
    assert!(out.contains(&id) && out.contains("backup b-1: ok"), "{out}");
    let out = f.ok(&["verify", "b-1", "--read-data", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!((v["ok"].as_bool(), v["damage"].as_array().map(Vec::len)), (Some(true), Some(0)));
    assert!(v["chunks_read"].as_u64().unwrap() > 0, "{out}");
    assert_eq!(v["complete"], true, "{out}");
}

#[test]
fn verify_read_data_names_the_pack_with_a_flipped_byte() {
    let f = Fixture::new();
    make_image(&f.path("disk.img"), 2);
    let id = f.backup("b-1", "srv-a", "disk", &f.path("disk.img"));
    f.finish("b-1", &[&id]);
    let pack = walk(&f.repo().join("packs")).pop().expect("a pack was written");
    let mut bytes = fs::read(&pack).unwrap();
    bytes[100] ^= 0x40;
    fs::write(&pack, bytes).unwrap();

    // Without reading data the pack looks whole; reading it finds the damage.
    f.ok(&["verify", "b-1"]);
    let args = ["verify", "b-1", "--read-data"];
    let out = f.run(&args);
    check_exit(&out, 1, &args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let pack_name = pack.file_name().unwrap().to_str().unwrap();
    let line =
        stdout.lines().find(|l| l.starts_with("DAMAGED")).unwrap_or_else(|| panic!("{stdout}"));
    assert!(line.contains(pack_name) && line.contains(&id) && line.contains("offset"), "{line}");
    assert!(stderr(&out).contains("backup b-1: damaged"), "{}", stderr(&out));

    let out = f.run(&["verify", "b-1", "--read-data", "--json"]);
    check_exit(&out, 1, &args);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let d = &v["damage"][0];
    assert_eq!(d["kind"], "chunk_corrupt");
    assert_eq!(d["manifest"].as_str(), Some(id.as_str()));
    assert!(d["pack"].as_str().unwrap().ends_with(pack_name), "{d}");
    assert!(d["offset"].is_u64() && d["chunk"].is_string(), "{d}");
}

#[test]
fn verify_of_another_backup_ignores_damage_that_is_not_its_own() {
    let f = Fixture::new();
    make_image(&f.path("a.img"), 3);
    make_image(&f.path("b.img"), 4);
    let a = f.backup("b-1", "srv-a", "disk", &f.path("a.img"));
    f.finish("b-1", &[&a]);
    let before = walk(&f.repo().join("packs"));
    let b = f.backup("b-2", "srv-a", "disk", &f.path("b.img"));
    f.finish("b-2", &[&b]);
    let theirs: Vec<PathBuf> =
        walk(&f.repo().join("packs")).into_iter().filter(|p| !before.contains(p)).collect();
    assert_eq!(theirs.len(), 1, "b-2 wrote one pack of its own");
    fs::remove_file(&theirs[0]).unwrap();

    // b-1 is checked alone: b-2's damage neither fails it nor costs it a read.
    let out = f.ok(&["verify", "b-1", "--read-data", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["manifests_checked"], v["manifests"].as_array().unwrap().len(), "{v}");
    assert_eq!(v["other_damage"], 0, "{v}");
    let args = ["verify", "b-2"];
    let out = f.run(&args);
    check_exit(&out, 1, &args);
    assert!(String::from_utf8_lossy(&out.stdout).contains("is missing"));
}

#[test]
fn restore_writes_identical_bytes_and_keeps_holes() {
    let f = Fixture::new();
    make_image(&f.path("disk.img"), 5);
    let id = f.backup("b-1", "srv-a", "disk", &f.path("disk.img"));
    f.finish("b-1", &[&id]);
    let target = f.path("restored.img");
    let out = f.ok(&["restore", "b-1", "--server", "srv-a", "--to", target.to_str().unwrap()]);
    assert!(out.contains("restored srv-a/disk of backup b-1"), "{out}");
    assert_restored(&target, &f.path("disk.img"));
}

#[test]
fn a_memory_budget_of_one_mib_restores_and_verifies_the_same_and_zero_is_refused() {
    let f = Fixture::new();
    make_image(&f.path("disk.img"), 6);
    let id = f.backup("b-1", "srv-a", "disk", &f.path("disk.img"));
    f.finish("b-1", &[&id]);
    // The smallest budget: small index blocks, runs and sort buffers, the same bytes.
    let target = f.path("restored.img");
    let target = target.to_str().unwrap();
    f.ok(&["restore", "b-1", "--server", "srv-a", "--to", target, "--memory-budget-mib", "1"]);
    assert_restored(&f.path("restored.img"), &f.path("disk.img"));
    f.ok(&["verify", "b-1", "--read-data", "--memory-budget-mib", "1"]);
    for bad in ["0", "2000000", "lots"] {
        let args = ["verify", "b-1", "--memory-budget-mib", bad];
        let out = f.run(&args);
        check_exit(&out, 2, &args);
        assert!(stderr(&out).contains("--memory-budget-mib"), "{}", stderr(&out));
        assert!(stderr(&out).contains("MiB"), "{}", stderr(&out));
    }
}

#[test]
fn restore_refuses_a_non_empty_target_without_force() {
    let f = Fixture::new();
    make_image(&f.path("disk.img"), 6);
    let id = f.backup("b-1", "srv-a", "disk", &f.path("disk.img"));
    f.finish("b-1", &[&id]);
    let target = f.path("busy.img");
    fs::write(&target, b"precious").unwrap();
    let to = target.to_str().unwrap();
    let args = ["restore", "b-1", "--server", "srv-a", "--volume", "disk", "--to", to];
    let out = f.run(&args);
    check_exit(&out, 2, &args);
    let err = stderr(&out);
    assert!(err.contains(to) && err.contains("not empty") && err.contains("--force"), "{err}");
    assert_eq!(fs::read(&target).unwrap(), b"precious");

    f.ok(&[&args[..], &["--force"]].concat());
    assert_eq!(fs::read(&target).unwrap(), fs::read(f.path("disk.img")).unwrap());
}

#[test]
fn restore_of_several_volumes_fills_a_directory() {
    let f = Fixture::new();
    make_image(&f.path("root.img"), 7);
    make_image(&f.path("data.img"), 8);
    let root = f.backup("b-1", "srv-a", "root", &f.path("root.img"));
    let data = f.backup("b-1", "srv-a", "/srv/data", &f.path("data.img"));
    let other = f.backup("b-1", "srv-b", "root", &f.path("data.img"));
    f.finish("b-1", &[&root, &data, &other]);
    let to = f.path("out");
    let out =
        f.ok(&["restore", "b-1", "--server", "srv-a", "--to", to.to_str().unwrap(), "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v.as_array().map(Vec::len), Some(2), "{out}");
    assert_restored(&to.join("srv-a-root.img"), &f.path("root.img"));
    assert_restored(&to.join("srv-a-srv_data.img"), &f.path("data.img"));
    assert_eq!(fs::read_dir(&to).unwrap().count(), 2);

    let args = ["restore", "b-1", "--server", "srv-c", "--to", "x"];
    let out = f.run(&args);
    check_exit(&out, 2, &args);
    assert!(stderr(&out).contains("no server srv-c"), "{}", stderr(&out));
}

#[test]
fn a_backup_manifest_decides_which_volumes_belong_to_the_backup() {
    let f = Fixture::new();
    make_image(&f.path("old.img"), 9);
    make_image(&f.path("new.img"), 10);
    let old = f.backup("b-1", "srv-a", "disk", &f.path("old.img"));
    let chosen = f.backup("b-1", "srv-a", "disk", &f.path("new.img"));
    // The listener's backup manifest names the volume manifest of the copy it committed.
    let _ = old;
    let backup_id = f.finish("b-1", &[&chosen]);

    let out = f.ok(&["verify", "b-1", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let ids: Vec<&str> =
        v["manifests"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, [backup_id.as_str(), chosen.as_str()]);
    let target = f.path("restored.img");
    f.ok(&["restore", "b-1", "--server", "srv-a", "--to", target.to_str().unwrap()]);
    assert_restored(&target, &f.path("new.img"));
}

#[test]
fn a_wrong_passphrase_exits_2_and_says_so() {
    let f = Fixture::new();
    make_image(&f.path("disk.img"), 11);
    f.backup("b-1", "srv-a", "disk", &f.path("disk.img"));
    for args in [
        &["verify", "b-1"][..],
        &["restore", "b-1", "--server", "srv-a", "--to", "/nonexistent/x.img"],
        &["repo", "backup", "--backup", "b-2", "--server", "s", "--volume", "v", "/dev/null"],
    ] {
        let out = f.run_with(args, &f.path("wrong"));
        check_exit(&out, 2, args);
        let err = stderr(&out);
        assert!(err.contains("wrong passphrase or key for repository"), "{args:?}: {err}");
        assert!(!err.contains(PASSPHRASE) && !err.contains("not the passphrase"), "{err}");
    }
}

#[test]
fn a_key_file_unlocks_what_it_locked() {
    let f = Fixture::bare();
    let key = f.path("repo.key");
    fs::write(&key, [7u8; 32]).unwrap();
    let key = key.to_str().unwrap();
    let init = Command::new(BIN)
        .args(["repo", "init", "--key-file", key])
        .env("STILLPOINT_REPO", f.repo())
        .env_remove("STILLPOINT_REPO_PASSPHRASE_FILE")
        .output()
        .unwrap();
    check_exit(&init, 0, &["repo", "init"]);
    // The passphrase file in the environment alongside --key-file is ambiguous: refused.
    let args = ["verify", "b-1", "--key-file", key];
    let out = f.run(&args);
    check_exit(&out, 2, &args);
    assert!(stderr(&out).contains("only one of"), "{}", stderr(&out));
    let out = f.run(&["verify", "b-1"]);
    assert!(stderr(&out).contains("wrong passphrase or key"), "{}", stderr(&out));
}

#[test]
fn init_refuses_an_existing_repository_and_a_missing_secret() {
    let f = Fixture::new();
    let args = ["repo", "init"];
    let out = f.run(&args);
    check_exit(&out, 2, &args);
    assert!(stderr(&out).contains("not empty"), "{}", stderr(&out));
    assert!(f.repo().join("config").is_file());

    let out = Command::new(BIN)
        .args(["verify", "b-1", "--repo", f.repo().to_str().unwrap()])
        .env_remove("STILLPOINT_REPO_PASSPHRASE_FILE")
        .env_remove("STILLPOINT_REPO_KEY_FILE")
        .output()
        .unwrap();
    check_exit(&out, 2, &["verify"]);
    assert!(stderr(&out).contains("--passphrase-file"), "{}", stderr(&out));
}

#[test]
fn verify_of_an_unknown_backup_is_a_usage_error() {
    let f = Fixture::new();
    let args = ["verify", "nope"];
    let out = f.run(&args);
    check_exit(&out, 2, &args);
    assert!(stderr(&out).contains("backup nope: no manifest"), "{}", stderr(&out));
}

/// What a FAILED or ABORTED saveset copy leaves: the volume manifests of the servers that were
/// copied, and no backup manifest (the listener writes it only once every server is in).
fn an_aborted_backup() -> Fixture {
    let f = Fixture::new();
    make_image(&f.path("root.img"), 12);
    make_image(&f.path("data.img"), 13);
    f.backup("b-1", "srv-a", "root", &f.path("root.img"));
    f.backup("b-1", "srv-b", "data", &f.path("data.img"));
    f
}

#[test]
fn verify_of_a_backup_without_a_backup_manifest_exits_1_and_says_incomplete() {
    let f = an_aborted_backup();
    let args = ["verify", "b-1"];
    let out = f.run(&args);
    check_exit(&out, 1, &args);
    let err = stderr(&out);
    assert!(
        err.contains("backup b-1 is incomplete") && err.contains("no backup manifest"),
        "{err}"
    );
    assert!(err.contains("no cut"), "{err}");
    assert!(err.contains("srv-a/root") && err.contains("srv-b/data"), "{err}");
    assert!(err.contains("--incomplete"), "{err}");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("ok"), "{out:?}");

    // Checked anyway on request: the volumes are whole, the backup is not, and the report says so.
    let out = f.run(&["verify", "b-1", "--incomplete", "--read-data", "--json"]);
    check_exit(&out, 0, &args);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((v["complete"].as_bool(), v["ok"].as_bool()), (Some(false), Some(true)), "{v}");
    assert!(stderr(&out).contains("WARNING: backup b-1 is incomplete"), "{}", stderr(&out));
    let out = f.ok(&["verify", "b-1", "--incomplete"]);
    assert!(out.contains("INCOMPLETE") && !out.contains("backup b-1: ok\n"), "{out}");
}

#[test]
fn restore_of_a_backup_without_a_backup_manifest_exits_1_and_writes_nothing() {
    let f = an_aborted_backup();
    let target = f.path("restored.img");
    let args = ["restore", "b-1", "--server", "srv-a", "--to", target.to_str().unwrap()];
    let out = f.run(&args);
    check_exit(&out, 1, &args);
    let err = stderr(&out);
    assert!(err.contains("backup b-1 is incomplete") && err.contains("--incomplete"), "{err}");
    assert!(!target.exists(), "restore wrote {}", target.display());
    let dir = f.path("dir");
    let args = ["restore", "b-1", "--server", "srv-a", "--to", dir.to_str().unwrap()];
    check_exit(&f.run(&args), 1, &args);
    assert!(!dir.exists(), "restore created {}", dir.display());
}

#[test]
fn restore_of_an_incomplete_backup_with_the_flag_restores_and_warns() {
    let f = an_aborted_backup();
    let target = f.path("restored.img");
    let to = target.to_str().unwrap();
    let args = ["restore", "b-1", "--server", "srv-a", "--to", to, "--incomplete", "--json"];
    let out = f.run(&args);
    check_exit(&out, 0, &args);
    assert!(stderr(&out).contains("WARNING: backup b-1 is incomplete"), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["complete"], false, "{v}");
    assert_restored(&target, &f.path("root.img"));
}

/// Every file under `dir`, sorted.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files.sort();
    files
}

#[test]
fn restore_writes_the_servers_artifacts_beside_its_volumes() {
    let f = Fixture::new();
    make_image(&f.path("root.img"), 7);
    let a = f.backup("b-1", "srv-a", "root", &f.path("root.img"));
    let b = f.backup("b-1", "srv-b", "root", &f.path("root.img"));
    let label: &[u8] = b"START WAL LOCATION: 0/2000028\n";
    f.finish_with(
        "b-1",
        &[&a, &b],
        &[
            ("srv-a", "pg", "backup_label", label),
            ("srv-a", "pg", "tablespace_map", b""),
            ("srv-b", "mysql", "binlog_position", b"binlog.000003:157"),
        ],
    );
    let to = f.path("out");
    fs::create_dir(&to).unwrap();
    let out = f.ok(&["restore", "b-1", "--server", "srv-a", "--to", to.to_str().unwrap()]);
    let dir = to.join("srv-a/artifacts/pg");
    assert_eq!(fs::read(dir.join("backup_label")).unwrap(), label);
    assert_eq!(fs::read(dir.join("tablespace_map")).unwrap(), b"");
    assert!(!to.join("srv-b").exists(), "only the restored server's");
    assert!(
        out.contains(&format!(
            "wrote artifact pg/backup_label of srv-a in backup b-1 (30 B) to {}",
            dir.join("backup_label").display()
        )),
        "{out}"
    );
    assert_restored(&to.join("srv-a-root.img"), &f.path("root.img"));

    // A single target file: the artifacts go beside it; --json says where.
    let target = f.path("single/srv-b.img");
    fs::create_dir(f.path("single")).unwrap();
    let args = ["restore", "b-1", "--server", "srv-b", "--to", target.to_str().unwrap(), "--json"];
    let v: serde_json::Value = serde_json::from_str(&f.ok(&args)).unwrap();
    let artifacts_dir = f.path("single/srv-b/artifacts");
    assert_eq!(v[0]["artifacts_dir"], artifacts_dir.to_str().unwrap(), "{v}");
    assert_eq!(
        fs::read(artifacts_dir.join("mysql/binlog_position")).unwrap(),
        b"binlog.000003:157"
    );

    // An artifact file holding something else is not overwritten without --force, and no
    // volume is written either.
    fs::write(dir.join("backup_label"), "edited by hand").unwrap();
    fs::remove_file(to.join("srv-a-root.img")).unwrap();
    let args = ["restore", "b-1", "--server", "srv-a", "--to", to.to_str().unwrap()];
    let out = f.run(&args);
    check_exit(&out, 2, &args);
    assert!(stderr(&out).contains("exists with other contents; pass --force"), "{}", stderr(&out));
    assert!(!to.join("srv-a-root.img").exists(), "checked before any volume was written");
    f.ok(&[&args[..], &["--force"]].concat());
    assert_eq!(fs::read(dir.join("backup_label")).unwrap(), label);
}

#[test]
fn an_artifact_name_that_is_a_path_is_refused_before_anything_is_written() {
    let f = Fixture::new();
    make_image(&f.path("root.img"), 7);
    let a = f.backup("b-1", "srv-a", "root", &f.path("root.img"));
    f.finish_with("b-1", &[&a], &[("srv-a", "pg", "../../escape", b"x")]);
    let to = f.path("out");
    let args = ["restore", "b-1", "--server", "srv-a", "--to", to.to_str().unwrap()];
    let out = f.run(&args);
    check_exit(&out, 2, &args);
    assert!(stderr(&out).contains("refusing to write artifacts of srv-a"), "{}", stderr(&out));
    assert!(!f.path("escape").exists() && !to.exists());
}

/// Every file under `dir` with its size.
fn tree(dir: &Path) -> Vec<(PathBuf, u64)> {
    let mut out: Vec<(PathBuf, u64)> =
        walk(dir).into_iter().map(|p| (p.clone(), fs::metadata(&p).unwrap().len())).collect();
    out.sort();
    out
}

#[test]
fn prune_dry_run_changes_nothing_and_a_sigkilled_prune_leaves_a_repository_that_restores() {
    use std::io::{BufRead, BufReader};
    let f = Fixture::new();
    make_image(&f.path("a.img"), 11);
    make_image(&f.path("b.img"), 12);
    let a = f.backup("b-1", "srv-a", "disk", &f.path("a.img"));
    f.finish("b-1", &[&a]);
    let b = f.backup("b-2", "srv-a", "disk", &f.path("b.img"));
    let b_backup = f.finish("b-2", &[&b]);
    // What `forget b-2` does: its manifests go.
    for id in [&b, &b_backup] {
        fs::remove_file(f.repo().join("manifests").join(id)).unwrap();
    }

    let before = tree(&f.repo());
    let out = f.ok(&["repo", "prune", "--dry-run", "--grace", "0"]);
    assert!(out.starts_with("dry run, nothing changed: scanned 2 manifests, 2 packs"), "{out}");
    assert!(out.contains("would delete: 1 packs and 1 index files"), "{out}");
    assert_eq!(tree(&f.repo()), before, "a dry run changes nothing");
    let args = ["repo", "prune", "--grace", "soon"];
    let refused = f.run(&args);
    check_exit(&refused, 2, &args);
    assert!(stderr(&refused).contains("\"soon\" is not a duration"), "{}", stderr(&refused));

    // Killed after it deleted the index file and before the pack (change 4 of 5).
    let mut child = Command::new(BIN)
        .args(["repo", "prune", "--grace", "0"])
        .env("STILLPOINT_REPO", f.repo())
        .env("STILLPOINT_REPO_PASSPHRASE_FILE", f.path("pass"))
        .env("STILLPOINT_PRUNE_TEST_STALL_AT", "4")
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut said = Vec::new();
    for line in BufReader::new(child.stderr.take().unwrap()).lines() {
        let line = line.unwrap();
        let stalled = line.contains("stalled");
        said.push(line);
        if stalled {
            break;
        }
    }
    assert!(said.iter().any(|l| l.starts_with("prune: step 3: delete index/")), "{said:?}");
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert_eq!(walk(&f.repo().join("index")).len(), 1, "the index file went first");
    assert_eq!(walk(&f.repo().join("packs")).len(), 2, "the pack did not");

    let out = f.ok(&["verify", "b-1", "--read-data", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["ok"], true, "{v}");
    let target = f.path("restored.img");
    f.ok(&["restore", "b-1", "--server", "srv-a", "--to", target.to_str().unwrap()]);
    assert_restored(&target, &f.path("a.img"));

    // The killed prune's lock looks like a running writer's for 30 minutes: the next prune
    // says so and leaves the pack without index alone (it could be that writer's).
    let out = f.ok(&["repo", "prune", "--grace", "0"]);
    assert!(
        out.contains("0 packs without index") && out.contains("running backup: locks/"),
        "{out}"
    );
    assert_eq!(walk(&f.repo().join("packs")).len(), 2);
    // As the README says: no backup runs, so the lock goes by hand; then the job is finished,
    // and a backup after it dedups against what stayed.
    for lock in walk(&f.repo().join("locks")) {
        fs::remove_file(lock).unwrap();
    }
    let out = f.ok(&["repo", "prune", "--grace", "0", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (v["orphan_packs_deleted"].as_u64(), v["dry_run"].as_bool()),
        (Some(1), Some(false)),
        "{v}"
    );
    assert!(v["bytes_freed"].as_u64().unwrap() > 100_000, "{v}");
    assert_eq!(walk(&f.repo().join("packs")).len(), 1);
    f.ok(&["verify", "b-1", "--read-data"]);
    let again = f.backup("b-3", "srv-a", "disk", &f.path("a.img"));
    let _ = again;
    assert_eq!(walk(&f.repo().join("packs")).len(), 1, "nothing new stored");
}

/// `repo backup --base-dir DIR --json` (what `bench/scale.sh` calls): the first backup keeps a
/// base, the next reads only what changed since, and the JSON carries the change-tracking
/// figures; a base dir that cannot clone (ext4 here) still backs up, reading everything.
#[test]
fn repo_backup_with_a_base_dir_reads_only_what_changed_and_says_so_in_json() {
    let f = Fixture::new();
    let img = f.path("xfs.img");
    File::create(&img).unwrap().set_len(320 * MIB).unwrap();
    let mkfs = Command::new("mkfs.xfs").args(["-q", "-m", "reflink=1"]).arg(&img).status();
    assert!(mkfs.unwrap().success());
    let mnt = f.path("mnt");
    fs::create_dir(&mnt).unwrap();
    assert!(Command::new("mount")
        .arg("-o")
        .arg("loop")
        .arg(&img)
        .arg(&mnt)
        .status()
        .unwrap()
        .success());
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(mnt.clone());

    let lun = mnt.join("lun");
    make_image(&lun, 5);
    let bases = mnt.join("bases");
    let backup = |name: &str, snap: &Path, extra: &[&str]| -> serde_json::Value {
        let snap = snap.to_str().unwrap();
        let args = [
            &["repo", "backup", "--backup", name, "--server", "s", "--volume", "v", "--json"][..],
            extra,
            &[snap],
        ]
        .concat();
        serde_json::from_str(&f.ok(&args)).unwrap()
    };
    let clone = |to: &str| {
        let snap = mnt.join(to);
        assert!(Command::new("cp")
            .arg("--reflink=always")
            .arg(&lun)
            .arg(&snap)
            .status()
            .unwrap()
            .success());
        snap
    };
    let base_args = ["--base-dir", bases.to_str().unwrap(), "--group", "g"];
    let first = backup("b1", &clone("s1"), &base_args);
    assert_eq!(first["change_map"], "none: no base kept yet", "{first}");
    File::options().write(true).open(&lun).unwrap().write_all_at(&[7u8; 8192], 2 * MIB).unwrap();
    let s2 = clone("s2");
    let second = backup("b2", &s2, &base_args);
    assert!(second["change_map"].as_str().unwrap().starts_with("fiemap: "), "{second}");
    assert_eq!(second["bytes_read"], 8192, "{second}");
    assert_eq!(second["bytes_skipped"], 8 * MIB - 8192, "{second}");
    assert!(second["sampled_chunks"].as_u64().unwrap() >= 64, "{second}");
    assert_eq!(second["sample_mismatches"], 0, "{second}");
    f.finish("b2", &[second["manifest"].as_str().unwrap()]);
    let out = f.path("restored");
    f.ok(&["restore", "b2", "--server", "s", "--to", out.to_str().unwrap()]);
    assert_restored(&out, &s2);

    // A base dir on another filesystem: nothing kept, everything read, success.
    let elsewhere = f.path("bases-on-ext4");
    let other = ["--base-dir", elsewhere.to_str().unwrap()];
    backup("x1", &s2, &other);
    let x2 = backup("x2", &s2, &other);
    assert_eq!(x2["change_map"], "none: no base kept yet", "{x2}");
    assert_eq!(x2["bytes_skipped"], 0, "{x2}");

    let bad = f.run(&[
        "repo",
        "backup",
        "--backup",
        "y",
        "--server",
        "s",
        "--volume",
        "v",
        "--sample",
        "101",
        s2.to_str().unwrap(),
    ]);
    check_exit(&bad, 2, &["--sample 101"]);
}

#[test]
fn a_backup_without_a_base_names_the_volumes_newest_backup_as_its_parent() {
    let f = Fixture::new();
    make_image(&f.path("disk.img"), 7);
    let args = |backup: &'static str, volume: &'static str| {
        let image = f.path("disk.img").to_str().unwrap().to_owned();
        let base = ["repo", "backup", "--backup", backup, "--server", "srv-a", "--volume", volume];
        let out = f.ok(&[&base[..], &["--json", &image]].concat());
        serde_json::from_str::<serde_json::Value>(&out).unwrap()
    };
    let first = args("b-1", "disk");
    assert!(first.get("parent").is_none(), "the first backup of a volume has none: {first}");
    let second = args("b-2", "disk");
    assert_eq!(second["parent"], first["manifest"], "{second}");
    // Nothing changed: the chunk list is the parent's, only the manifest is new.
    assert!(second["metadata_bytes"].as_u64().unwrap() < 1024, "{second}");
    assert_eq!(second["change_map"], "none", "{second}");
    let other = args("b-2", "other");
    assert!(other.get("parent").is_none(), "another volume's backups are not its parent: {other}");
}
