//! Unlocked handles to one repository for copies that run at the same time (the listener's
//! copies of several servers, an agent's copies of several backups): each copy takes an idle
//! handle or unlocks another, and gives it back, so the KDF runs once per concurrent copy,
//! not once per copy. Concurrent writers through separate handles are safe by the format.

use std::path::Path;
use std::sync::{Arc, Mutex};

use crate::claims::Claims;
use crate::error::Result;
use crate::index::Index;
use crate::{Location, OpenOptions, Repository, Secret};

/// A repository location, its secret, and the handles not in use.
pub struct Pool {
    location: Location,
    secret: Secret,
    idle: Mutex<Vec<Repository>>,
    /// Chunks the pool's copies are storing right now, so concurrent copies of similar disks
    /// store each new chunk once.
    claims: Arc<Claims>,
    /// One index for every handle: its memory is the process's, not the handle's.
    index: Arc<Index>,
    options: OpenOptions,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").field("location", &self.location.to_string()).finish()
    }
}

impl Pool {
    /// Unlocks the repository once, so that a wrong secret or a missing repository shows when
    /// the caller starts rather than at its first copy.
    pub fn open(location: Location, secret: Secret) -> Result<Pool> {
        Self::open_with(location, secret, OpenOptions::default())
    }

    /// [`Pool::open`] with the index cache and memory budget of `options`; every handle of
    /// the pool shares one index.
    pub fn open_with(location: Location, secret: Secret, options: OpenOptions) -> Result<Pool> {
        let claims = Arc::new(Claims::default());
        let mut first = Repository::open_with(&location, &secret, options.clone())?;
        first.claims = Some(Arc::clone(&claims));
        let index = Arc::clone(&first.index);
        Ok(Pool { location, secret, idle: Mutex::new(vec![first]), claims, index, options })
    }

    /// Where the repository is.
    pub fn location(&self) -> &Location {
        &self.location
    }

    /// Runs `f` with a handle of its own; `open` maps an error unlocking another handle.
    pub fn with_repo<T, E>(
        &self,
        open: impl FnOnce(crate::Error) -> E,
        f: impl FnOnce(&mut Repository) -> std::result::Result<T, E>,
    ) -> std::result::Result<T, E> {
        // A panic elsewhere while holding the lock leaves a list of valid handles: keep going.
        let idle = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let mut repo = match idle {
            Some(r) => r,
            None => {
                let mut repo = Repository::open_shared(
                    &self.location,
                    &self.secret,
                    &self.options,
                    Arc::clone(&self.index),
                )
                .map_err(open)?;
                repo.claims = Some(Arc::clone(&self.claims));
                repo
            }
        };
        let result = f(&mut repo);
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).push(repo);
        result
    }
}

/// Why the files a config or command line names do not give a secret.
#[derive(Debug)]
pub enum SecretFileError {
    /// Both a passphrase file and a key file were named.
    Both,
    /// Neither was named.
    Neither,
    /// The named file could not be read, or the passphrase file is empty. `field` is
    /// `passphrase_file` or `key_file`, for messages that name the setting.
    Read { field: &'static str, error: crate::Error },
}

/// The secret from the one file named: a passphrase file (one trailing newline, or CRLF, is
/// not part of the passphrase; an empty passphrase is refused) or a key file (its whole
/// contents).
pub fn secret_from_files(
    passphrase_file: Option<&Path>,
    key_file: Option<&Path>,
) -> std::result::Result<Secret, SecretFileError> {
    match (passphrase_file, key_file) {
        (Some(_), Some(_)) => Err(SecretFileError::Both),
        (None, None) => Err(SecretFileError::Neither),
        (Some(path), None) => Secret::from_passphrase_file(path)
            .map_err(|error| SecretFileError::Read { field: "passphrase_file", error }),
        (None, Some(path)) => Secret::from_key_file(path)
            .map_err(|error| SecretFileError::Read { field: "key_file", error }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_files_are_read_as_operators_write_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let write = |name: &str, text: &[u8]| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).expect("write");
            path
        };
        let plain = write("plain", b"correct horse");
        let newline = write("newline", b"correct horse\n");
        let crlf = write("crlf", b"correct horse\r\n");
        let read = |p: &Path| match secret_from_files(Some(p), None) {
            Ok(s) => s.expose().to_vec(),
            Err(e) => panic!("{p:?}: {e:?}"),
        };
        for p in [&plain, &newline, &crlf] {
            assert_eq!(read(p), b"correct horse", "{p:?}: one line ending is not the secret");
        }
        let empty = write("empty", b"\n");
        let err = secret_from_files(Some(&empty), None).expect_err("empty");
        assert!(
            matches!(&err, SecretFileError::Read { field: "passphrase_file", error } if error.to_string().contains("empty")),
            "{err:?}"
        );
        let key = write("key", b"\x00\x01binary\n");
        let Ok(secret) = secret_from_files(None, Some(&key)) else { panic!("key file") };
        assert_eq!(secret.expose(), b"\x00\x01binary\n", "a key file is taken whole");
        assert!(matches!(secret_from_files(Some(&plain), Some(&key)), Err(SecretFileError::Both)));
        assert!(matches!(secret_from_files(None, None), Err(SecretFileError::Neither)));
        let missing = secret_from_files(None, Some(&dir.path().join("nope")));
        assert!(matches!(missing, Err(SecretFileError::Read { field: "key_file", .. })));
    }
}
