//! A chaos TCP proxy for one link, controlled by the test: pass bytes through, hold them
//! (blackhole: connections stay open, nothing moves, like a cable pulled), or reset every
//! connection. This kernel has no netem, so network faults live here (FAULTS.md 0.7).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Mode {
    Pass = 0,
    /// Hold every byte in both directions until the mode changes.
    Blackhole = 1,
    /// Close every connection, new and old.
    Reset = 2,
}

pub struct Proxy {
    pub addr: SocketAddr,
    mode: Arc<AtomicU8>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Listens on a free loopback port and forwards to `target`.
    pub async fn start(target: SocketAddr) -> std::io::Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let mode = Arc::new(AtomicU8::new(Mode::Pass as u8));
        let shared = Arc::clone(&mode);
        let task = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let mode = Arc::clone(&shared);
                tokio::spawn(async move {
                    if mode.load(Ordering::SeqCst) == Mode::Reset as u8 {
                        return;
                    }
                    let Ok(outbound) = TcpStream::connect(target).await else { return };
                    let (ri, wi) = inbound.into_split();
                    let (ro, wo) = outbound.into_split();
                    let up = tokio::spawn(pump(ri, wo, Arc::clone(&mode)));
                    let down = tokio::spawn(pump(ro, wi, mode));
                    let _ = tokio::join!(up, down);
                });
            }
        });
        Ok(Proxy { addr, mode, task })
    }

    pub fn set(&self, mode: Mode) {
        self.mode.store(mode as u8, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mode: Arc<AtomicU8>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // Hold before reading, so a blackhole also stops acknowledging at the TCP level once
        // the kernel buffers fill, as a dead link would.
        loop {
            match mode.load(Ordering::SeqCst) {
                m if m == Mode::Pass as u8 => break,
                m if m == Mode::Reset as u8 => return,
                _ => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
        let n = match tokio::time::timeout(Duration::from_millis(100), from.read(&mut buf)).await {
            Err(_) => continue,
            Ok(Ok(0)) | Ok(Err(_)) => return,
            Ok(Ok(n)) => n,
        };
        // Bytes read just as the mode flipped are held, not sent.
        while mode.load(Ordering::SeqCst) == Mode::Blackhole as u8 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if mode.load(Ordering::SeqCst) == Mode::Reset as u8
            || to.write_all(&buf[..n]).await.is_err()
        {
            return;
        }
    }
}
