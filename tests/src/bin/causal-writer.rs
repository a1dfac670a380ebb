//! The causal workload: writes linked records across several servers' LUNs (A, then B naming A,
//! then C naming B), syncing each before the next, until killed. `pause`/`resume` are its
//! application hooks, called by the agents' `exec` quiescers: pause returns once the writer
//! promises not to touch that server's LUN until resumed.
//!
//! `check` follows every link across copies of the LUNs, in chain order.
//!
//! usage: causal-writer run CONTROL_DIR LUN... | pause|resume CONTROL_DIR SERVER | check IMAGE...

use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use stillpoint_tests::records::{Record, RECORD};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.as_slice() {
        [cmd, control, luns @ ..] if cmd == "run" && !luns.is_empty() => {
            run(Path::new(control), luns)
        }
        [cmd, control, server] if cmd == "pause" => pause(Path::new(control), server),
        [cmd, images @ ..] if cmd == "check" && images.len() >= 2 => check(images),
        [cmd, control, server] if cmd == "resume" => {
            fs::remove_file(Path::new(control).join(format!("pause-{server}")))
                .or_else(ignore_missing)
        }
        _ => {
            eprintln!("usage: causal-writer run CONTROL_DIR LUN... | pause|resume CONTROL_DIR SERVER | check IMAGE...");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("causal-writer: {e}");
            ExitCode::FAILURE
        }
    }
}

fn ignore_missing(e: std::io::Error) -> std::io::Result<()> {
    if e.kind() == std::io::ErrorKind::NotFound {
        Ok(())
    } else {
        Err(e)
    }
}

fn check(images: &[String]) -> std::io::Result<()> {
    let records = images
        .iter()
        .map(|p| stillpoint_tests::records::read_records(Path::new(p)))
        .collect::<std::io::Result<Vec<_>>>()?;
    match stillpoint_tests::records::check_chain(&records) {
        Ok(links) => {
            let counts: Vec<String> = records.iter().map(|r| r.len().to_string()).collect();
            println!("consistent: {links} cross-server links checked, every record found the record it names (records per image: {})", counts.join(", "));
            Ok(())
        }
        Err(e) => Err(std::io::Error::other(format!("TORN BACKUP: {e}"))),
    }
}

fn pause(control: &Path, server: &str) -> std::io::Result<()> {
    fs::write(control.join(format!("pause-{server}")), b"")?;
    let acked = control.join(format!("paused-{server}"));
    let start = Instant::now();
    while !acked.exists() {
        if start.elapsed() > Duration::from_secs(10) {
            return Err(std::io::Error::other(format!("writer did not pause {server} within 10s")));
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    Ok(())
}

/// The server name of a LUN path `.../luns/<server>/<lun>.lun`.
fn server_of(lun: &Path) -> String {
    lun.parent().and_then(|p| p.file_name()).and_then(|n| n.to_str()).unwrap_or("?").to_string()
}

/// Acknowledges pause requests (the writer is between writes, so every ack is true) and waits
/// while `server` itself is paused.
fn gate(control: &Path, servers: &[String], server: &str) -> std::io::Result<()> {
    loop {
        let mut blocked = false;
        for s in servers {
            let asked = control.join(format!("pause-{s}")).exists();
            let acked = control.join(format!("paused-{s}"));
            if asked && !acked.exists() {
                fs::write(&acked, b"")?;
            } else if !asked && acked.exists() {
                fs::remove_file(&acked).or_else(ignore_missing)?;
            }
            blocked |= asked && s == server;
        }
        if !blocked {
            return Ok(());
        }
        std::thread::sleep(Duration::from_micros(500));
    }
}

fn run(control: &Path, luns: &[String]) -> std::io::Result<()> {
    let paths: Vec<PathBuf> = luns.iter().map(PathBuf::from).collect();
    let servers: Vec<String> = paths.iter().map(|p| server_of(p)).collect();
    let files = paths
        .iter()
        .map(|p| OpenOptions::new().write(true).open(p))
        .collect::<std::io::Result<Vec<_>>>()?;
    let capacity = files[0].metadata()?.len() / RECORD as u64;
    for seq in 0..capacity {
        for (i, file) in files.iter().enumerate() {
            gate(control, &servers, &servers[i])?;
            let names = if i == 0 { u64::MAX } else { seq };
            file.write_all_at(&Record { seq, names }.encode(), seq * RECORD as u64)?;
            file.sync_data()?;
        }
    }
    Ok(())
}
