//! Keys and sealing: the passphrase KDF (argon2id), the master key, keyed chunk ids (blake3) and
//! XChaCha20-Poly1305 sealed blobs. No file IO here.

use std::fmt;
use std::path::Path;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{Key, XChaCha20Poly1305, XNonce};
use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};

/// Bytes added to every sealed blob: a 24-byte nonce and a 16-byte tag.
pub const SEAL_OVERHEAD: usize = 24 + 16;

/// A passphrase or the contents of a key file. Its `Debug` never shows the bytes.
#[derive(Clone)]
pub struct Secret(Vec<u8>);

impl Secret {
    /// A secret typed by an operator.
    pub fn passphrase(text: impl Into<String>) -> Self {
        Secret(text.into().into_bytes())
    }

    /// The whole contents of a key file (any bytes; e.g. 32 random bytes, hex or not).
    pub fn from_key_file(path: &Path) -> Result<Self> {
        std::fs::read(path).map(Secret).ctx("read key file", path)
    }

    pub(crate) fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Argon2id cost parameters, stored in the repository's config.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KdfParams {
    /// Memory in KiB.
    pub m_cost_kib: u32,
    /// Passes over memory.
    pub t_cost: u32,
    /// Lanes.
    pub p_cost: u32,
}

impl Default for KdfParams {
    /// 19 MiB, 2 passes, 1 lane: OWASP's minimum for argon2id, about 0.05 s here and 19 MiB
    /// at every open (repositories keep the parameters they were created with).
    fn default() -> Self {
        KdfParams { m_cost_kib: 19 * 1024, t_cost: 2, p_cost: 1 }
    }
}

/// Derives the 32-byte key-encryption key from a secret with argon2id.
pub(crate) fn derive_kek(secret: &Secret, salt: &[u8], p: KdfParams) -> Result<[u8; 32]> {
    let bad =
        |e: argon2::Error| Error::Damaged { what: "config kdf".into(), reason: e.to_string() };
    let params = argon2::Params::new(p.m_cost_kib, p.t_cost, p.p_cost, Some(32)).map_err(bad)?;
    let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let mut out = [0u8; 32];
    argon.hash_password_into(secret.expose(), salt, &mut out).map_err(bad)?;
    Ok(out)
}

/// Random bytes from the operating system.
pub(crate) fn random<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).expect("the OS random source is available");
    b
}

/// The repository's keys, unlocked from the config: one for sealing, one for chunk ids.
pub(crate) struct MasterKey {
    seal: XChaCha20Poly1305,
    id_key: [u8; 32],
}

impl MasterKey {
    /// 64 bytes: 32 for sealing, then 32 for keyed chunk ids.
    pub(crate) fn from_bytes(b: &[u8; 64]) -> Self {
        let (s, i) = b.split_at(32);
        let key = Key::try_from(s).expect("32 bytes");
        MasterKey { seal: XChaCha20Poly1305::new(&key), id_key: i.try_into().expect("32 bytes") }
    }

    /// The content address of a chunk: blake3 keyed with the repository's id key.
    pub(crate) fn chunk_id(&self, data: &[u8]) -> [u8; 32] {
        *blake3::keyed_hash(&self.id_key, data).as_bytes()
    }

    pub(crate) fn seal(&self, aad: &[u8], plain: &[u8]) -> Vec<u8> {
        seal_with(&self.seal, aad, plain)
    }

    pub(crate) fn open(&self, aad: &[u8], blob: &[u8]) -> Option<Vec<u8>> {
        open_with(&self.seal, aad, blob)
    }

    /// Seals `buf[24..]` in place into the same layout as [`MasterKey::seal`]: the first 24
    /// bytes of `buf` are room for the nonce (their contents are ignored).
    pub(crate) fn seal_in_place(&self, aad: &[u8], mut buf: Vec<u8>) -> Vec<u8> {
        use chacha20poly1305::aead::AeadInOut;
        let nonce_bytes: [u8; 24] = random();
        let nonce = XNonce::from(nonce_bytes);
        buf[..24].copy_from_slice(&nonce_bytes);
        let tag = self
            .seal
            .encrypt_inout_detached(&nonce, aad, (&mut buf[24..]).into())
            .expect("encryption of an in-memory buffer cannot fail");
        buf.extend_from_slice(&tag);
        buf
    }

    /// [`MasterKey::open`] decrypting in place: no second copy of a large blob.
    pub(crate) fn open_in_place(&self, aad: &[u8], mut blob: Vec<u8>) -> Option<Vec<u8>> {
        use chacha20poly1305::aead::AeadInOut;
        if blob.len() < SEAL_OVERHEAD {
            return None;
        }
        let end = blob.len() - 16;
        let nonce = XNonce::try_from(&blob[..24]).ok()?;
        let tag = chacha20poly1305::Tag::try_from(&blob[end..]).ok()?;
        self.seal.decrypt_inout_detached(&nonce, aad, (&mut blob[24..end]).into(), &tag).ok()?;
        blob.truncate(end);
        blob.drain(..24);
        Some(blob)
    }
}

/// Seals `plain` with a fresh random nonce: `nonce(24) || ciphertext || tag(16)`.
pub(crate) fn seal_with(cipher: &XChaCha20Poly1305, aad: &[u8], plain: &[u8]) -> Vec<u8> {
    let nonce_bytes: [u8; 24] = random();
    let nonce = XNonce::from(nonce_bytes);
    let ct = cipher
        .encrypt(&nonce, Payload { msg: plain, aad })
        .expect("encryption of an in-memory buffer cannot fail");
    let mut out = Vec::with_capacity(24 + ct.len());
    out.extend_from_slice(&nonce_bytes);
    out.extend_from_slice(&ct);
    out
}

/// Opens a blob made by [`seal_with`]; `None` if it was altered or the key is wrong.
pub(crate) fn open_with(cipher: &XChaCha20Poly1305, aad: &[u8], blob: &[u8]) -> Option<Vec<u8>> {
    if blob.len() < SEAL_OVERHEAD {
        return None;
    }
    let (n, ct) = blob.split_at(24);
    let nonce = XNonce::try_from(n).ok()?;
    cipher.decrypt(&nonce, Payload { msg: ct, aad }).ok()
}

/// A cipher for the key-encryption key.
pub(crate) fn kek_cipher(kek: &[u8; 32]) -> XChaCha20Poly1305 {
    XChaCha20Poly1305::new(&Key::from(*kek))
}

/// Lowercase hex.
pub(crate) fn hex(bytes: &[u8]) -> String {
    const D: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(D[usize::from(b >> 4)] as char);
        s.push(D[usize::from(b & 15)] as char);
    }
    s
}

/// Parses lowercase or uppercase hex into exactly `N` bytes.
pub(crate) fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    let s = s.as_bytes();
    if s.len() != 2 * N {
        return None;
    }
    let nib = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = nib(s[2 * i])? << 4 | nib(s[2 * i + 1])?;
    }
    Some(out)
}

/// Variable-length hex, for the config's salt and sealed key.
pub(crate) fn unhex_vec(s: &str) -> Option<Vec<u8>> {
    if s.len() & 1 == 1 {
        return None;
    }
    (0..s.len() / 2).map(|i| u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()).collect()
}
