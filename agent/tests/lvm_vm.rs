//! The LVM provider against real LVM, in a VM (this machine's kernel has no device-mapper).
//! On the host this binary boots the kernel and initramfs that `tests/vm/build-image.sh` built,
//! with itself appended, on a fresh sparse disk; inside (`--guest`) it makes a volume group and
//! runs each scenario, printing `STILLPOINT-VM PASS|FAIL <name>`, which the host checks. The
//! LVM thin change maps run here too, through the agent's copier (`Saveset::copy_now`) into a
//! repository in the guest's tmpfs. Its own harness (no libtest): one process per VM, and the
//! guest has no cargo around it. `STILLPOINT_VM_CONSOLE=1` prints the guest's console.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context};
use stillpoint_agent::config::SavesetConfig;
use stillpoint_agent::copy::{Request, Saveset};
use stillpoint_agent::snapshot::lvm::{Lvm, LvmConfig};
use stillpoint_agent::snapshot::SnapshotProvider;
use stillpoint_proto::CopyStats;
use stillpoint_saveset::{InitOptions, KdfParams, ManifestId, Repository, Secret, VolumeMeta};

/// The scenarios the guest runs, in order; the host expects a PASS for each.
const SCENARIOS: [&str; 10] = [
    "snapshots_of_a_thick_and_a_thin_lv_hold_what_was_written_before_while_a_writer_writes",
    "list_finds_them_by_tag",
    "create_again_returns_the_same_snapshots",
    "delete_removes_them_and_is_safe_to_repeat",
    "check_refuses_thick_snapshots_larger_than_the_free_space",
    "a_failure_at_the_third_volume_removes_the_first_two",
    "snapshot_time_of_a_thick_and_a_thin_lv",
    "a_chain_of_30_lvm_thin_incrementals_reads_what_changed_and_restores_byte_identical",
    "a_thin_base_deleted_or_made_again_is_not_trusted_and_a_thick_lv_gets_no_map",
    "the_sampling_verify_catches_a_dropped_thin_range",
];

const MARK: &str = "STILLPOINT-VM";
/// The whole boot, tests and power-off must fit in this. Software emulation is slow and slower
/// still beside other tests on two cores: the provider's scenarios take about 50 s alone, the
/// thin change maps about 5 minutes more (39 backups of about 15 LVM, dmsetup and thin_delta
/// commands each, about a second per command here, and 37 restores). Beside two release builds
/// and a benchmark the 30-incremental chain alone took 1000 s (2026-12-05) and the run passed
/// 1200 s: the deadline is there to end a hung guest, not to time it, so it allows four times
/// the idle run.
const VM_DEADLINE: Duration = Duration::from_secs(1800);

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--guest") {
        std::process::exit(guest());
    }
    if args.iter().any(|a| a == FAILPOINT_CHILD) {
        std::process::exit(match failpoint_child() {
            Ok(()) => 0,
            Err(e) => {
                println!("{MARK} failpoint child: {e:#}");
                1
            }
        });
    }
    if args.iter().any(|a| a == "--list") {
        println!("lvm_vm: test");
        return;
    }
    // cargo test passes its filters along: run only when one names this test or none is given.
    let filters: Vec<&String> = args.iter().filter(|a| !a.starts_with('-')).collect();
    if !filters.is_empty()
        && !filters.iter().any(|f| {
            "lvm_vm".contains(f.as_str()) || SCENARIOS.iter().any(|s| s.contains(f.as_str()))
        })
    {
        println!("lvm_vm: 0 passed, 0 failed");
        return;
    }
    match host() {
        Ok(n) => println!("lvm_vm: {n} passed, 0 failed"),
        Err(e) => {
            eprintln!("lvm_vm: {e:#}");
            println!("lvm_vm: 0 passed, 1 failed");
            std::process::exit(1);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The host side: boot, watch the console, judge.

/// Kills qemu when the test ends, however it ends.
struct Vm(Child);

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn image_dir() -> PathBuf {
    match std::env::var_os("STILLPOINT_VM_DIR") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
            .join(".cache/stillpoint/vm"),
    }
}

fn host() -> anyhow::Result<usize> {
    let dir = image_dir();
    let (kernel, base) = (dir.join("vmlinuz"), dir.join("initramfs.cpio.gz"));
    ensure!(
        kernel.is_file() && base.is_file(),
        "no VM image in {}: run tests/vm/build-image.sh (.ci/run does)",
        dir.display()
    );
    let qemu = "qemu-system-x86_64";
    let scratch = tempfile::tempdir().context("temp dir")?;
    // The test binary and its libraries first, uncompressed; the image's gzip archive after it
    // (the kernel reads concatenated archives, but not a plain one after a compressed one).
    let initrd = scratch.path().join("initrd");
    let mut out = std::fs::File::create(&initrd).context("create initrd")?;
    let exe = std::env::current_exe().context("own path")?;
    let mut cpio = Cpio::default();
    cpio.file("test/guest", &std::fs::read(&exe).context("read own binary")?, 0o755);
    for lib in libraries(&exe)? {
        let rel = lib.strip_prefix("/").unwrap_or(&lib).to_string_lossy().into_owned();
        cpio.file(
            &rel,
            &std::fs::read(&lib).with_context(|| format!("read {}", lib.display()))?,
            0o755,
        );
    }
    out.write_all(&cpio.finish())?;
    out.write_all(&std::fs::read(&base).context("read base initramfs")?)?;
    drop(out);
    let disk = scratch.path().join("disk.img");
    std::fs::File::create(&disk)?.set_len(1 << 30)?;

    let started = Instant::now();
    let child = Command::new(qemu)
        // 1 GiB: the thin scenarios' repositories and restores live in the guest's tmpfs.
        .args(["-accel", "tcg", "-cpu", "max", "-m", "1024", "-smp", "1"])
        .args(["-nographic", "-no-reboot", "-nic", "none", "-monitor", "none", "-serial", "stdio"])
        .arg("-kernel")
        .arg(&kernel)
        .arg("-initrd")
        .arg(&initrd)
        .args(["-append", "console=ttyS0 panic=-1 quiet"])
        .arg("-drive")
        .arg(format!("file={},if=virtio,format=raw,cache=unsafe", disk.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("start {qemu} (apt-get install qemu-system-x86; .ci/run does)"))?;
    let mut vm = Vm(child);
    let (tx, rx) = mpsc::channel::<String>();
    let stdout = vm.0.stdout.take().ok_or_else(|| anyhow!("qemu stdout"))?;
    let stderr = vm.0.stderr.take().ok_or_else(|| anyhow!("qemu stderr"))?;
    for pipe in [Box::new(stdout) as Box<dyn Read + Send>, Box::new(stderr)] {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                if tx.send(line.replace('\r', "")).is_err() {
                    break;
                }
            }
        });
    }
    drop(tx);
    let mut console = Vec::new();
    let mut booted = None;
    // Why the console ended: the guest's EXIT line, or else what cut it short.
    let unfinished = loop {
        let left = VM_DEADLINE.saturating_sub(started.elapsed());
        match rx.recv_timeout(left) {
            Ok(line) => {
                if line.contains(&format!("{MARK} BOOTED")) {
                    booted = Some(started.elapsed());
                }
                let end = line.contains(&format!("{MARK} EXIT"));
                console.push(line);
                if end {
                    break None;
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                break Some(format!("the VM did not finish within {}s", VM_DEADLINE.as_secs()))
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                break Some(format!(
                    "qemu exited ({}) before the guest finished",
                    vm.0.wait().map_or_else(|e| e.to_string(), |s| s.to_string())
                ))
            }
        }
    };
    let wall = started.elapsed();
    drop(vm);
    let log = console.join("\n");
    if std::env::var_os("STILLPOINT_VM_CONSOLE").is_some() {
        println!("{log}");
    }
    if let Some(why) = unfinished {
        bail!("{why}; console:\n{log}");
    }
    let mut passed = 0;
    let mut problems = Vec::new();
    for name in SCENARIOS {
        let pass = format!("{MARK} PASS {name}");
        if console.iter().any(|l| l.contains(&pass)) {
            passed += 1;
            println!("lvm_vm::{name} ... ok");
        } else {
            let why = console
                .iter()
                .find(|l| l.contains(&format!("{MARK} FAIL {name}")))
                .map_or("no PASS or FAIL line".to_string(), |l| l.clone());
            println!("lvm_vm::{name} ... FAILED");
            problems.push(format!("{name}: {why}"));
        }
    }
    for line in console.iter().filter(|l| l.contains(&format!("{MARK} TIME"))) {
        println!(
            "lvm_vm: {}",
            line.trim_start_matches(|c| c != 'S').trim_start_matches(MARK).trim()
        );
    }
    println!(
        "lvm_vm: boot to init {:.1}s, whole VM run {:.1}s (qemu TCG, software emulation)",
        booted.unwrap_or_default().as_secs_f64(),
        wall.as_secs_f64()
    );
    if !problems.is_empty() {
        bail!("{} scenario(s) failed:\n{}\nconsole:\n{log}", problems.len(), problems.join("\n"));
    }
    Ok(passed)
}

/// The shared libraries `exe` loads, from `ldd`.
fn libraries(exe: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let out = Command::new("ldd").arg(exe).output().context("run ldd")?;
    ensure!(
        out.status.success(),
        "ldd {} failed: {}",
        exe.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut libs = Vec::new();
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            [_, "=>", path, ..] if path.starts_with('/') => libs.push(PathBuf::from(path)),
            [path, ..] if path.starts_with('/') => libs.push(PathBuf::from(path)),
            _ => {}
        }
    }
    Ok(libs)
}

/// A newc cpio archive, as the kernel unpacks into its initial root: directories first.
#[derive(Default)]
struct Cpio {
    out: Vec<u8>,
    dirs: Vec<String>,
    ino: u32,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.ino += 1;
        let fields =
            [self.ino, mode, 0, 0, 1, 0, data.len() as u32, 0, 0, 0, 0, name.len() as u32 + 1, 0];
        self.out.extend_from_slice(b"070701");
        for f in fields {
            self.out.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }

    fn file(&mut self, path: &str, data: &[u8], perm: u32) {
        let mut parent = String::new();
        for part in path.split('/').collect::<Vec<_>>().split_last().map_or(&[][..], |(_, d)| d) {
            parent = if parent.is_empty() { part.to_string() } else { format!("{parent}/{part}") };
            if !self.dirs.contains(&parent) {
                self.dirs.push(parent.clone());
                self.entry(&parent.clone(), 0o040755, &[]);
            }
        }
        self.entry(path, 0o100000 | perm, data);
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[]);
        while !self.out.len().is_multiple_of(512) {
            self.out.push(0);
        }
        self.out
    }
}

// ---------------------------------------------------------------------------------------------
// The guest side: a volume group on /dev/vda, then each scenario.

const BLOCK: usize = 4096;
/// How much of each origin the tests write and read back: 2048 blocks.
const SPAN: usize = 8 << 20;

fn lvm(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("lvm")
        .args(args)
        .env("LVM_SUPPRESS_FD_WARNINGS", "1")
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("run lvm {}", args.join(" ")))?;
    ensure!(
        out.status.success(),
        "lvm {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn provider(size: &str, volumes: &[&str]) -> anyhow::Result<Lvm> {
    let config = LvmConfig {
        snapshot_size: size.into(),
        thin_pool_max_percent: 80.0,
        command_timeout_ms: 60_000,
    };
    Lvm::new(&config, &volumes.iter().map(|v| v.to_string()).collect::<Vec<_>>())
}

fn setup() -> anyhow::Result<()> {
    lvm(&["pvcreate", "-y", "/dev/vda"])?;
    lvm(&["vgcreate", "vg0", "/dev/vda"])?;
    lvm(&["lvcreate", "-y", "-L", "64M", "-n", "thick", "vg0"])?;
    lvm(&["lvcreate", "-y", "-L", "128M", "-T", "vg0/pool"])?;
    lvm(&["lvcreate", "-y", "-V", "96M", "-T", "vg0/pool", "-n", "thin"])?;
    lvm(&["lvcreate", "-y", "-L", "256M", "-n", "big", "vg0"])?;
    for dev in ["/dev/vg0/thick", "/dev/vg0/thin"] {
        write_all(dev, 0)?;
    }
    Ok(())
}

/// Block `i` of generation `gen`: its index and generation, so any mix-up shows.
fn pattern(i: usize, gen: u8) -> Vec<u8> {
    let mut b = vec![(i as u8).wrapping_mul(31).wrapping_add(gen); BLOCK];
    b[..16].copy_from_slice(format!("g{gen:02}b{i:012}").as_bytes());
    b
}

fn open_sync(dev: &str) -> anyhow::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DSYNC)
        .open(dev)
        .with_context(|| format!("open {dev}"))
}

fn write_all(dev: &str, gen: u8) -> anyhow::Result<()> {
    let mut f = open_sync(dev)?;
    let mut all = Vec::with_capacity(SPAN);
    for i in 0..SPAN / BLOCK {
        all.extend_from_slice(&pattern(i, gen));
    }
    f.write_all(&all).with_context(|| format!("write {dev}"))
}

fn read_span(dev: &str) -> anyhow::Result<Vec<u8>> {
    let mut buf = vec![0u8; SPAN];
    std::fs::File::open(dev)
        .and_then(|mut f| f.read_exact(&mut buf))
        .with_context(|| format!("read {dev}"))?;
    Ok(buf)
}

fn tagged_lvs() -> anyhow::Result<Vec<String>> {
    let out = lvm(&["lvs", "--noheadings", "-o", "lv_name,lv_tags", "vg0"])?;
    Ok(out
        .lines()
        .filter(|l| l.contains("stillpoint-backup:"))
        .map(|l| l.split_whitespace().next().unwrap_or_default().to_string())
        .collect())
}

const BACKUP: &str = "20261202T210601Z:3fa9c1";

fn guest() -> i32 {
    let t0 = Instant::now();
    if let Err(e) = setup() {
        println!("{MARK} FAIL setup: {e:#}");
        return 1;
    }
    println!("{MARK} setup done in {}ms", t0.elapsed().as_millis());
    let mut failed = 0;
    for name in SCENARIOS {
        let started = Instant::now();
        let result = match name {
            "snapshots_of_a_thick_and_a_thin_lv_hold_what_was_written_before_while_a_writer_writes" => {
                snapshots_hold_what_was_written_before()
            }
            "list_finds_them_by_tag" => list_finds_them(),
            "create_again_returns_the_same_snapshots" => create_again(),
            "delete_removes_them_and_is_safe_to_repeat" => delete_twice(),
            "check_refuses_thick_snapshots_larger_than_the_free_space" => budget(),
            "a_failure_at_the_third_volume_removes_the_first_two" => third_fails(),
            "snapshot_time_of_a_thick_and_a_thin_lv" => timing(),
            "a_chain_of_30_lvm_thin_incrementals_reads_what_changed_and_restores_byte_identical" => {
                thin_chain()
            }
            "a_thin_base_deleted_or_made_again_is_not_trusted_and_a_thick_lv_gets_no_map" => {
                thin_base_not_trusted()
            }
            "the_sampling_verify_catches_a_dropped_thin_range" => thin_failpoint(),
            other => Err(anyhow!("no scenario {other}")),
        };
        match result {
            Ok(()) => println!("{MARK} PASS {name} ({}ms)", started.elapsed().as_millis()),
            Err(e) => {
                failed += 1;
                println!("{MARK} FAIL {name}: {}", format!("{e:#}").replace('\n', " / "));
            }
        }
    }
    i32::from(failed > 0)
}

fn snapshots_hold_what_was_written_before() -> anyhow::Result<()> {
    let lvm = provider("20%", &["vg0/thick", "vg0/thin"])?;
    let detail = lvm.check(&["vg0/thick".into(), "vg0/thin".into()])?;
    ensure!(detail.contains("vg0: thick snapshots need 16.0 MiB"), "check said {detail}");
    // A writer rewrites every block of both origins in order with generation 1, each write
    // synchronous; `done` counts the blocks written on both.
    let done = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (done, stop) = (done.clone(), stop.clone());
        std::thread::spawn(move || -> anyhow::Result<()> {
            let mut thick = open_sync("/dev/vg0/thick")?;
            let mut thin = open_sync("/dev/vg0/thin")?;
            for i in 0..SPAN / BLOCK {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let b = pattern(i, 1);
                thick.write_all(&b)?;
                thin.write_all(&b)?;
                done.store(i + 1, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(1));
            }
            Ok(())
        })
    };
    while done.load(Ordering::SeqCst) < 64 {
        std::thread::sleep(Duration::from_millis(1));
    }
    let before = done.load(Ordering::SeqCst);
    let snaps = lvm.create(BACKUP, &["vg0/thick".into(), "vg0/thin".into()])?;
    let after = done.load(Ordering::SeqCst);
    stop.store(true, Ordering::SeqCst);
    writer.join().map_err(|_| anyhow!("writer panicked"))??;
    println!(
        "{MARK} writer: {before} blocks written before the create, {} during it, of {}",
        after - before,
        SPAN / BLOCK
    );
    ensure!(after > before, "the writer wrote nothing while the snapshots were taken");
    let locators: Vec<&str> = snaps.iter().map(|s| s.locator.as_str()).collect();
    ensure!(
        locators
            == [
                "/dev/vg0/thick.sp.20261202T210601Z+3fa9c1",
                "/dev/vg0/thin.sp.20261202T210601Z+3fa9c1"
            ],
        "locators {locators:?}"
    );
    for snap in &snaps {
        let data = read_span(&snap.locator)?;
        let (mut new, mut old) = (0, 0);
        for (i, block) in data.chunks(BLOCK).enumerate() {
            let is_new = block == pattern(i, 1).as_slice();
            let is_old = block == pattern(i, 0).as_slice();
            ensure!(is_new || is_old, "{}: block {i} is neither generation", snap.locator);
            // Written and synced before the create: in the snapshot. Written after it
            // returned: not in it.
            ensure!(
                i >= before || is_new,
                "{}: block {i} written before the snapshot is missing",
                snap.locator
            );
            ensure!(
                i <= after || is_old,
                "{}: block {i} written after the snapshot is in it",
                snap.locator
            );
            if is_new {
                new += 1;
            } else {
                old += 1;
            }
        }
        println!(
            "{MARK} {}: {new} new blocks, {old} old, as written before its instant",
            snap.locator
        );
        ensure!(snap.size_bytes > 0, "{} has no size", snap.locator);
    }
    Ok(())
}

fn list_finds_them() -> anyhow::Result<()> {
    // A new provider, as after an agent restart: it finds them by their tags.
    let listed = provider("20%", &["vg0/thick", "vg0/thin"])?.list()?;
    let got: Vec<(String, String, String, u64)> =
        listed.into_iter().map(|(b, s)| (b, s.volume, s.locator, s.size_bytes)).collect();
    let want = vec![
        (
            BACKUP.to_string(),
            "vg0/thick".to_string(),
            "/dev/vg0/thick.sp.20261202T210601Z+3fa9c1".to_string(),
            64 << 20,
        ),
        (
            BACKUP.to_string(),
            "vg0/thin".to_string(),
            "/dev/vg0/thin.sp.20261202T210601Z+3fa9c1".to_string(),
            96 << 20,
        ),
    ];
    ensure!(got == want, "list gave {got:?}");
    for (_, _, locator, _) in &got {
        ensure!(Path::new(locator).exists(), "{locator} has no device");
    }
    Ok(())
}

fn create_again() -> anyhow::Result<()> {
    let lvm = provider("20%", &["vg0/thick", "vg0/thin"])?;
    let before = tagged_lvs()?;
    let again = lvm.create(BACKUP, &["vg0/thick".into(), "vg0/thin".into()])?;
    ensure!(tagged_lvs()? == before, "a second create made LVs: {before:?} -> {:?}", tagged_lvs()?);
    ensure!(
        again.len() == 2 && again[0].locator.ends_with("thick.sp.20261202T210601Z+3fa9c1"),
        "{again:?}"
    );
    // Still the first instant's data: block 0 was rewritten before the first create.
    ensure!(read_span(&again[0].locator)?[..BLOCK] == pattern(0, 1)[..], "block 0 changed");
    Ok(())
}

fn delete_twice() -> anyhow::Result<()> {
    let lvm = provider("20%", &["vg0/thick", "vg0/thin"])?;
    ensure!(lvm.delete("someone-else")? == 0, "deleted another backup's snapshots");
    let n = lvm.delete(BACKUP)?;
    ensure!(n == 2, "deleted {n}");
    ensure!(tagged_lvs()?.is_empty(), "left {:?}", tagged_lvs()?);
    ensure!(lvm.list()?.is_empty(), "list still shows some");
    ensure!(!Path::new("/dev/vg0/thick.sp.20261202T210601Z+3fa9c1").exists(), "device left");
    ensure!(lvm.delete(BACKUP)? == 0, "a repeat deleted something");
    Ok(())
}

/// Runs `f` with a filler LV taking all but `mib` MiB of vg0's free space, then removes it.
fn with_free(mib: u64, f: impl FnOnce() -> anyhow::Result<()>) -> anyhow::Result<()> {
    let free = lvm(&["vgs", "--noheadings", "--units", "m", "--nosuffix", "-o", "vg_free", "vg0"])?;
    let free: f64 = free.trim().parse().with_context(|| format!("vg_free {free:?}"))?;
    let filler = (free as u64).checked_sub(mib).ok_or_else(|| anyhow!("only {free} MiB free"))?;
    lvm(&["lvcreate", "-y", "-L", &format!("{filler}m"), "-n", "filler", "vg0"])?;
    let result = f();
    lvm(&["lvremove", "-y", "vg0/filler"])?;
    result
}

fn budget() -> anyhow::Result<()> {
    let volumes: Vec<String> = vec!["vg0/thick".into(), "vg0/big".into()];
    with_free(100, || {
        // Half of 64 MiB and of 256 MiB: 160 MiB, with 100 MiB free.
        let e =
            provider("50%", &["vg0/thick", "vg0/big"])?.check(&volumes).err().ok_or_else(|| {
                anyhow!("160 MiB of thick snapshots passed the check with 100 MiB free")
            })?;
        let e = format!("{e:#}");
        ensure!(
            e.contains("volume group vg0 has 100.0 MiB free but the thick snapshots need 160.0 MiB (vg0/thick 32.0 MiB, vg0/big 128.0 MiB)"),
            "{e}"
        );
        println!("{MARK} check refused: {e}");
        let ok = provider("10%", &["vg0/thick", "vg0/big"])?.check(&volumes)?;
        ensure!(ok.contains("vg0: thick snapshots need 36.0 MiB of 100.0 MiB free"), "{ok}");
        Ok(())
    })
}

fn third_fails() -> anyhow::Result<()> {
    // Half of each origin with 100 MiB free: the thin one uses its pool, the first thick one
    // (32 MiB) fits, the second (128 MiB) does not.
    let volumes: Vec<String> = vec!["vg0/thin".into(), "vg0/thick".into(), "vg0/big".into()];
    let lvm = provider("50%", &["vg0/thin", "vg0/thick", "vg0/big"])?;
    with_free(100, || {
        ensure!(lvm.check(&volumes).is_err(), "the check should see it does not fit");
        let e = match lvm.create("b3", &volumes) {
            Ok(s) => bail!("create succeeded: {s:?}"),
            Err(e) => format!("{e:#}"),
        };
        ensure!(
            e.contains("removed the 2 snapshot(s) taken before it")
                && e.contains("snapshot vg0/big"),
            "{e}"
        );
        ensure!(e.contains("stderr:"), "the error carries lvcreate's stderr: {e}");
        println!("{MARK} create failed as expected: {e}");
        ensure!(tagged_lvs()?.is_empty(), "left {:?}", tagged_lvs()?);
        ensure!(lvm.list()?.is_empty(), "list still shows some");
        Ok(())
    })
}

fn timing() -> anyhow::Result<()> {
    let lvm = provider("20%", &["vg0/thick", "vg0/thin"])?;
    let t = Instant::now();
    lvm.create("time-thick", &["vg0/thick".into()])?;
    let thick = t.elapsed();
    let t = Instant::now();
    lvm.create("time-thin", &["vg0/thin".into()])?;
    let thin = t.elapsed();
    let t = Instant::now();
    let checked = lvm.check(&["vg0/thick".into(), "vg0/thin".into()])?;
    let check = t.elapsed();
    ensure!(lvm.delete("time-thick")? == 1 && lvm.delete("time-thin")? == 1, "delete");
    println!(
        "{MARK} TIME thick snapshot {}ms, thin snapshot {}ms, check {}ms ({checked})",
        thick.as_millis(),
        thin.as_millis(),
        check.as_millis()
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// LVM thin change maps through the agent's copier.

/// The thin LV the change map scenarios back up: 16 MiB of random data in its own pool of
/// 64 KiB blocks (LVM's default chunk for a pool this size). Small: under software emulation
/// a 64 MiB restore took 14 s, and every one of the 31 backups is restored.
const CBT_LV: &str = "vg0/cbt";
const CBT_SIZE: u64 = 16 << 20;
const THIN_BLOCK: u64 = 64 << 10;
const GROUP: &str = "g";
const CBT_BASE: &str = "cbt.stillpoint.base.g";
const WORDS: &str = "lvm thin words";
const FAILPOINT_CHILD: &str = "--guest-failpoint";

/// A small deterministic generator, so a failing round can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 =
            self.0.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        (self.next() >> 33) % n
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for word in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            word.copy_from_slice(&v[..word.len()]);
        }
    }
}

/// Makes the thin LV once (its pool apart from the provider scenarios') and fills it.
fn cbt_lv() -> anyhow::Result<()> {
    if Path::new("/dev/vg0/cbt").exists() {
        return Ok(());
    }
    lvm(&["lvcreate", "-y", "-L", "64M", "-T", "vg0/cbtpool"])?;
    lvm(&["lvcreate", "-y", "-V", "16M", "-T", "vg0/cbtpool", "-n", "cbt"])?;
    let f = open_sync("/dev/vg0/cbt")?;
    let mut rng = Rng(1);
    let mut buf = vec![0u8; 1 << 20];
    for i in 0..CBT_SIZE >> 20 {
        rng.fill(&mut buf);
        std::os::unix::fs::FileExt::write_all_at(&f, &buf, i << 20).context("fill vg0/cbt")?;
    }
    Ok(())
}

/// Rewrites `(offset, len)` ranges of the thin LV with random bytes, synchronously.
fn rewrite(rng: &mut Rng, writes: &[(u64, u64)]) -> anyhow::Result<()> {
    let f = open_sync("/dev/vg0/cbt")?;
    for &(at, len) in writes {
        let mut buf = vec![0u8; len as usize];
        rng.fill(&mut buf);
        std::os::unix::fs::FileExt::write_all_at(&f, &buf, at).context("rewrite vg0/cbt")?;
    }
    Ok(())
}

/// blake3 of the first `size` bytes of `path`.
fn hash(path: &str, size: u64) -> anyhow::Result<blake3::Hash> {
    let mut f = std::fs::File::open(path).with_context(|| format!("open {path}"))?;
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        let n = buf.len().min(left as usize);
        f.read_exact(&mut buf[..n]).with_context(|| format!("read {path}"))?;
        h.update(&buf[..n]);
        left -= n as u64;
    }
    ensure!(f.read(&mut buf)? == 0, "{path} is longer than {size} bytes");
    Ok(h.finalize())
}

/// One repository in the guest's tmpfs, the agent's copier with `base_dir` on it, and the
/// provider: what a Copy RPC on the agent does, without the network the guest lacks.
struct Cbt {
    dir: PathBuf,
    saveset: Saveset,
    lvm: Lvm,
}

/// The repository and bases go with the scenario: the tmpfs is the guest's memory.
impl Drop for Cbt {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One backup as the copier reported it, and what its snapshot held.
struct Backup {
    id: String,
    stats: CopyStats,
    manifest: ManifestId,
    snapshot: blake3::Hash,
}

impl Cbt {
    fn open(dir: &str, sample: f64) -> anyhow::Result<Cbt> {
        let dir = PathBuf::from(dir);
        std::fs::create_dir_all(&dir)?;
        let repo = dir.join("repo");
        let opts = InitOptions {
            kdf: KdfParams { m_cost_kib: 1024, t_cost: 1, p_cost: 1 },
            ..InitOptions::default()
        };
        Repository::init_with(&repo, &Secret::passphrase(WORDS), opts)?;
        let pass = dir.join("pass");
        std::fs::write(&pass, format!("{WORDS}\n"))?;
        let config = SavesetConfig {
            repository: repo.display().to_string(),
            passphrase_file: Some(pass),
            key_file: None,
            copy_delay_ms_per_mib: 0,
            base_dir: Some(dir.join("bases")),
            sample,
            // Small, for the guest's memory (and so the setting is used on real LVM too).
            memory_budget_mib: Some(32),
        };
        let saveset =
            Saveset::open(&config, Some(&dir.join("cache"))).map_err(|e| anyhow!("{e}"))?;
        Ok(Cbt { dir, saveset, lvm: provider("20%", &[CBT_LV, "vg0/thick"])? })
    }

    /// Snapshots `volume` for backup `id` (the provider), hashes the snapshot, copies it as
    /// group g's through the agent's copier, and cleans up (the provider's delete).
    fn backup(&self, id: &str, volume: &str) -> anyhow::Result<Backup> {
        let t = Instant::now();
        let snaps = self.lvm.create(id, &[volume.to_string()])?;
        let snap = snaps.first().ok_or_else(|| anyhow!("no snapshot"))?.clone();
        let created = t.elapsed();
        let snapshot = hash(&snap.locator, snap.size_bytes)?;
        let hashed = t.elapsed();
        let request = Request {
            meta: VolumeMeta { backup: id.into(), server: "vm".into(), volume: String::new() },
            group: GROUP.into(),
            snapshots: vec![(snap.clone(), snap.size_bytes)],
        };
        let copied = self.saveset.copy_now(&request).map_err(|e| anyhow!("copy {id}: {e}"));
        let copy = t.elapsed();
        ensure!(self.lvm.delete(id)? == 1, "{id}: the cleanup deleted no snapshot");
        println!(
            "{MARK} {id}: snapshot {}ms, hash {}ms, copy {}ms, cleanup {}ms",
            created.as_millis(),
            (hashed - created).as_millis(),
            (copy - hashed).as_millis(),
            (t.elapsed() - copy).as_millis()
        );
        let done = copied?;
        let stats = done.stats.ok_or_else(|| anyhow!("{id}: no stats"))?;
        let manifest = done
            .volumes
            .first()
            .ok_or_else(|| anyhow!("{id}: no volume"))?
            .manifest_id
            .parse()
            .map_err(|e| anyhow!("{id}: manifest id: {e}"))?;
        Ok(Backup { id: id.into(), stats, manifest, snapshot })
    }

    /// Restores `b` into the tmpfs and checks it is byte-identical to its snapshot.
    fn check_restore(&self, b: &Backup) -> anyhow::Result<()> {
        let repo = Repository::open(&self.dir.join("repo"), &Secret::passphrase(WORDS))?;
        let out = self.dir.join("restored.raw");
        let _ = std::fs::remove_file(&out);
        repo.restore_volume(b.manifest, &out, false)?;
        let size = std::fs::metadata(&out)?.len();
        let restored = hash(&out.display().to_string(), size);
        std::fs::remove_file(&out)?;
        ensure!(restored? == b.snapshot, "{}: the restore differs from its snapshot", b.id);
        Ok(())
    }
}

/// The LVs of vg0 with a tag, as `name tags`.
fn tags_of(name: &str) -> anyhow::Result<Option<String>> {
    let out = lvm(&["lvs", "--noheadings", "-o", "lv_name,lv_tags", "vg0"])?;
    Ok(out.lines().find_map(|l| {
        let mut words = l.split_whitespace();
        (words.next() == Some(name)).then(|| words.next().unwrap_or_default().to_string())
    }))
}

/// The change map text the copier gives for the thin blocks `blocks`: adjacent ones are one
/// range.
fn map_text(blocks: &BTreeSet<u64>) -> String {
    let mut ranges = 0;
    let mut last = None;
    for &b in blocks {
        if last.is_none_or(|l| l + 1 != b) {
            ranges += 1;
        }
        last = Some(b);
    }
    format!("lvm-thin: {ranges} ranges, {} bytes", blocks.len() as u64 * THIN_BLOCK)
}

/// A full backup, then 30 incrementals each after about ten scattered 4 KiB rewrites and one
/// clustered run of 4-48 blocks (round 10 changes nothing): each map names exactly the 64 KiB
/// thin blocks written since the last backup, the copier reads only those (at least the bytes
/// written, at most their whole thin blocks: the pool tracks 64 KiB blocks, the repository 4 KiB
/// chunks, so a 4 KiB write costs a 64 KiB read), its sample finds nothing, and every backup
/// restores byte-identical to its snapshot (hashed when it was taken). Between backups only the
/// base stays, tagged as a base and never as a backup's snapshot.
fn thin_chain() -> anyhow::Result<()> {
    cbt_lv()?;
    let cbt = Cbt::open("/tmp/chain", stillpoint_saveset::DEFAULT_SAMPLE_PERCENT)?;
    let started = Instant::now();
    let full = cbt.backup("t00", CBT_LV)?;
    ensure!(full.stats.change_map == "none: no base kept yet", "{:?}", full.stats);
    ensure!(full.stats.bytes_skipped == 0 && full.stats.bytes_read == CBT_SIZE, "{:?}", full.stats);
    println!("{MARK} full: {}ms", started.elapsed().as_millis());
    let mut backups = vec![full];
    let mut rng = Rng(7);
    let mut each = Vec::new();
    for round in 1..=30u64 {
        let t = Instant::now();
        let mut writes = Vec::new();
        if round != 10 {
            for _ in 0..10 {
                writes.push((rng.below(CBT_SIZE / 4096) * 4096, 4096));
            }
            let len = (4 + rng.below(45)) * 4096;
            writes.push((rng.below((CBT_SIZE - len) / 4096) * 4096, len));
        }
        let blocks: BTreeSet<u64> = writes
            .iter()
            .flat_map(|&(at, len)| at / THIN_BLOCK..(at + len).div_ceil(THIN_BLOCK))
            .collect();
        let written: BTreeSet<u64> =
            writes.iter().flat_map(|&(at, len)| at / 4096..(at + len) / 4096).collect();
        rewrite(&mut rng, &writes)?;
        let b = cbt.backup(&format!("t{round:02}"), CBT_LV)?;
        let s = &b.stats;
        let changed = blocks.len() as u64 * THIN_BLOCK;
        ensure!(
            s.change_map == map_text(&blocks),
            "{}: {s:?}, expected {}",
            b.id,
            map_text(&blocks)
        );
        ensure!(s.bytes_skipped == CBT_SIZE - changed, "{}: {s:?}", b.id);
        ensure!(
            written.len() as u64 * 4096 <= s.bytes_read && s.bytes_read <= changed,
            "{}: read {} bytes for {} written in {} thin blocks: {s:?}",
            b.id,
            s.bytes_read,
            written.len() * 4096,
            blocks.len()
        );
        ensure!(s.sample_mismatches == 0 && s.sampled_chunks > 0, "{}: {s:?}", b.id);
        ensure!(tagged_lvs()?.is_empty(), "{}: a backup's snapshot was left", b.id);
        ensure!(
            tags_of(CBT_BASE)?.as_deref() == Some("stillpoint-base:g"),
            "{}: the base is not kept as a base",
            b.id
        );
        println!(
            "{MARK} {}: {} written, read {} ({}), {}ms",
            b.id,
            written.len() * 4096,
            s.bytes_read,
            s.change_map,
            t.elapsed().as_millis()
        );
        each.push(t.elapsed());
        backups.push(b);
    }
    let chain = started.elapsed();
    let t = Instant::now();
    for b in &backups {
        let t = Instant::now();
        cbt.check_restore(b)?;
        if b.id == "t00" {
            println!("{MARK} a restore: {}ms", t.elapsed().as_millis());
        }
    }
    // The base is no backup's snapshot: the provider's list shows nothing.
    ensure!(cbt.lvm.list()?.is_empty(), "the provider lists {:?}", cbt.lvm.list()?);
    let slowest = each.iter().max().copied().unwrap_or_default();
    println!(
        "{MARK} TIME thin chain: full + 30 incrementals {}ms (slowest incremental {}ms), 31 restores checked {}ms",
        chain.as_millis(),
        slowest.as_millis(),
        t.elapsed().as_millis()
    );
    Ok(())
}

/// A base someone deleted, or deleted and made again under its name, is not trusted: the next
/// backup reads everything and says why, restores byte-identical, and keeps a base the backup
/// after uses again. A thick LV gets no map and no base.
fn thin_base_not_trusted() -> anyhow::Result<()> {
    cbt_lv()?;
    let cbt = Cbt::open("/tmp/trust", stillpoint_saveset::DEFAULT_SAMPLE_PERCENT)?;
    let mut rng = Rng(11);
    let first = cbt.backup("u0", CBT_LV)?;
    // The chain's base was group g's too, but recorded in another base_dir: this one has none.
    ensure!(first.stats.change_map == "none: no base kept yet", "{:?}", first.stats);
    rewrite(&mut rng, &[(1 << 20, 4096)])?;
    let b = cbt.backup("u1", CBT_LV)?;
    ensure!(b.stats.change_map == "lvm-thin: 1 ranges, 65536 bytes", "{:?}", b.stats);
    cbt.check_restore(&b)?;

    // Deleted.
    lvm(&["lvremove", "-y", &format!("vg0/{CBT_BASE}")])?;
    rewrite(&mut rng, &[(2 << 20, 4096)])?;
    let b = cbt.backup("u2", CBT_LV)?;
    println!("{MARK} base deleted: {}", b.stats.change_map);
    ensure!(b.stats.change_map == format!("none: base vg0/{CBT_BASE} is gone"), "{:?}", b.stats);
    ensure!(b.stats.bytes_skipped == 0, "{:?}", b.stats);
    cbt.check_restore(&b)?;
    let b = cbt.backup("u3", CBT_LV)?;
    ensure!(b.stats.change_map == "lvm-thin: 0 ranges, 0 bytes", "kept again: {:?}", b.stats);
    cbt.check_restore(&b)?;

    // Deleted and made again under its name, with its tag: another LV.
    lvm(&["lvremove", "-y", &format!("vg0/{CBT_BASE}")])?;
    lvm(&["lvcreate", "-s", "-pr", "--addtag", "stillpoint-base:g", "-n", CBT_BASE, CBT_LV])?;
    rewrite(&mut rng, &[(3 << 20, 4096)])?;
    let b = cbt.backup("u4", CBT_LV)?;
    println!("{MARK} base made again: {}", b.stats.change_map);
    ensure!(
        b.stats.change_map.starts_with(&format!("none: base vg0/{CBT_BASE} is not the one kept")),
        "{:?}",
        b.stats
    );
    ensure!(b.stats.bytes_skipped == 0, "{:?}", b.stats);
    cbt.check_restore(&b)?;

    // A thick LV: no map, no base, and the copy says why.
    let b = cbt.backup("u5", "vg0/thick")?;
    println!("{MARK} thick: {}", b.stats.change_map);
    ensure!(b.stats.change_map.starts_with("none: vg0/thick is a thick LV"), "{:?}", b.stats);
    ensure!(b.stats.bytes_skipped == 0, "{:?}", b.stats);
    ensure!(tags_of("thick.stillpoint.base.g")?.is_none(), "a thick LV got a base");
    cbt.check_restore(&b)?;
    lvm(&["lvremove", "-y", &format!("vg0/{CBT_BASE}")])?;
    Ok(())
}

/// With `STILLPOINT_FAILPOINT=change-map-drop-range` the thin map loses its largest range; the
/// sampling verify (100% here, so surely) finds the difference, the volume is read whole and
/// restores byte-identical. In a child process: the failpoint is the process's environment.
fn thin_failpoint() -> anyhow::Result<()> {
    cbt_lv()?;
    let exe = std::env::current_exe().context("own path")?;
    let out = Command::new(exe)
        .arg(FAILPOINT_CHILD)
        .env(stillpoint_saveset::FAILPOINT_ENV, stillpoint_saveset::DROP_RANGE)
        .output()
        .context("run the failpoint child")?;
    let text = String::from_utf8_lossy(&out.stdout);
    for line in text.lines() {
        println!("{line}");
    }
    ensure!(out.status.success(), "the child failed: {}", String::from_utf8_lossy(&out.stderr));
    ensure!(text.contains("CHILD-CAUGHT"), "the child did not run");
    Ok(())
}

fn failpoint_child() -> anyhow::Result<()> {
    let cbt = Cbt::open("/tmp/failpoint", 100.0)?;
    let mut rng = Rng(13);
    cbt.backup("f0", CBT_LV)?;
    rewrite(&mut rng, &[(2 << 20, 2 << 20), (12 << 20, 4096)])?;
    let b = cbt.backup("f1", CBT_LV)?;
    let s = &b.stats;
    println!("{MARK} failpoint: {s:?}");
    ensure!(s.sample_mismatches > 0, "{s:?}");
    ensure!(s.change_map.starts_with("lvm-thin: 1 ranges, 65536 bytes (wrong: "), "{s:?}");
    ensure!(s.change_map.contains("whole volume read"), "{s:?}");
    cbt.check_restore(&b)?;
    lvm(&["lvremove", "-y", &format!("vg0/{CBT_BASE}")])?;
    println!("CHILD-CAUGHT");
    Ok(())
}
