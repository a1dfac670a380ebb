//! The agent's only unsafe code: sending a signal to a process (`kill(2)`), for the stop
//! quiescer and the guardian. Returns the raw `io::Error` so callers can tell ESRCH (no such
//! process) apart. Nothing else belongs here.
#![allow(unsafe_code)]

use std::io;

/// The signals the agent sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    Stop,
    Cont,
}

/// Sends `signal` to process `pid` (never a group: `pid` must be positive). ESRCH: no such process.
pub fn kill(pid: i32, signal: Signal) -> io::Result<()> {
    if pid <= 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("pid {pid} is not a process"),
        ));
    }
    let sig = match signal {
        Signal::Stop => libc::SIGSTOP,
        Signal::Cont => libc::SIGCONT,
    };
    // SAFETY: kill(2) takes two integers and touches no memory of ours; a positive pid names
    // one process, never a process group.
    if unsafe { libc::kill(pid, sig) } == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}
