//! The cluster's data dir: what is in it, who owns it, and the password file.
//!
//! ```text
//! DATA/
//!   cluster.json        metadata (see metadata.rs), the mark of a Borealis data dir
//!   up.lock             flock()ed by the running `borealis up`; holds its pid
//!   password            the postgres user's password, mode 0600
//!   logs/<node>.log     one log per process (the control plane's is logs/control.log)
//!   <node>/             each storage node's and instance's own data dir
//! ```

use crate::metadata::{FileStore, MetaError, MetadataStore, METADATA_FILE};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

pub const LOCK_FILE: &str = "up.lock";
pub const PASSWORD_FILE: &str = "password";
pub const LOGS_DIR: &str = "logs";

#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    #[error("{0} exists and is not a Borealis data dir (no {METADATA_FILE}, not empty); refusing to touch it")]
    NotACluster(PathBuf),
    #[error("{0} is not a directory")]
    NotADirectory(PathBuf),
    #[error("a cluster is already running on {dir} (pid {pid}); stop it first")]
    AlreadyRunning { dir: PathBuf, pid: String },
    #[error(transparent)]
    Meta(#[from] MetaError),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> DataDirError {
    let path = path.to_path_buf();
    move |source| DataDirError::Io { what, path, source }
}

/// What `up` found at the data dir path, decided without writing anything.
pub enum Found {
    /// Nothing there, or an empty directory: a new cluster will be created.
    Empty,
    /// An existing cluster's metadata.
    Cluster(Box<crate::metadata::ClusterMeta>),
}

/// Looks at `dir` read-only: an existing cluster, nothing, or something else (an
/// error, so that `up` never scribbles over a directory it does not own).
pub fn inspect(dir: &Path) -> Result<Found, DataDirError> {
    match std::fs::metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Found::Empty),
        Err(e) => return Err(io("cannot read data dir", dir)(e)),
        Ok(m) if !m.is_dir() => return Err(DataDirError::NotADirectory(dir.to_path_buf())),
        Ok(_) => {}
    }
    if let Some(meta) = FileStore::new(dir).load()? {
        return Ok(Found::Cluster(Box::new(meta)));
    }
    let mut entries = std::fs::read_dir(dir).map_err(io("cannot list data dir", dir))?;
    if entries.next().is_some() {
        return Err(DataDirError::NotACluster(dir.to_path_buf()));
    }
    Ok(Found::Empty)
}

/// An exclusive, process-lifetime claim on a data dir (flock on `up.lock`). The
/// kernel drops it when the process dies, however it dies, so a crashed `up` never
/// leaves a stale lock behind.
pub struct DirLock {
    _file: File,
}

impl DirLock {
    pub fn acquire(dir: &Path) -> Result<DirLock, DataDirError> {
        let path = dir.join(LOCK_FILE);
        // Opened with O_CLOEXEC (std's default), so children never inherit the lock.
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io("cannot open lock file", &path))?;
        // SAFETY: flock on a file descriptor we own; no memory is touched.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                let mut pid = String::new();
                let _ = file.read_to_string(&mut pid);
                let pid = if pid.trim().is_empty() {
                    "unknown".to_string()
                } else {
                    pid.trim().to_string()
                };
                return Err(DataDirError::AlreadyRunning {
                    dir: dir.to_path_buf(),
                    pid,
                });
            }
            return Err(io("cannot lock", &path)(err));
        }
        file.set_len(0)
            .map_err(io("cannot write lock file", &path))?;
        file.write_all(format!("{}\n", std::process::id()).as_bytes())
            .map_err(io("cannot write lock file", &path))?;
        Ok(DirLock { _file: file })
    }
}

/// Reads the stored password, if any.
pub fn read_password(dir: &Path) -> Result<Option<String>, DataDirError> {
    let path = dir.join(PASSWORD_FILE);
    match std::fs::read_to_string(&path) {
        Ok(s) => Ok(Some(s.trim_end_matches(['\n', '\r']).to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io("cannot read password file", &path)(e)),
    }
}

/// Writes the password file with mode 0600 (created so; never world-readable even
/// for an instant), durably.
pub fn write_password(dir: &Path, password: &str) -> Result<(), DataDirError> {
    let path = dir.join(PASSWORD_FILE);
    let tmp = dir.join(format!("{PASSWORD_FILE}.tmp"));
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io("cannot write password file", &tmp))?;
    file.write_all(format!("{password}\n").as_bytes())
        .and_then(|_| file.sync_all())
        .map_err(io("cannot write password file", &tmp))?;
    std::fs::rename(&tmp, &path).map_err(io("cannot write password file", &path))?;
    Ok(())
}

/// A random password of 20 letters and digits from the kernel's CSPRNG.
pub fn generate_password() -> std::io::Result<String> {
    const ALPHABET: &[u8] = b"abcdefghijkmnopqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789";
    let mut bytes = [0u8; 20];
    File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    // 256 % 57 != 0 gives a tiny bias; irrelevant at 20 characters (~116 bits).
    Ok(bytes
        .iter()
        .map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char)
        .collect())
}

/// A random cluster id (hex).
pub fn generate_id() -> std::io::Result<String> {
    let mut bytes = [0u8; 8];
    File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn inspect_refuses_foreign_dirs() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(matches!(inspect(&dir.path().join("new")), Ok(Found::Empty)));
        assert!(matches!(inspect(dir.path()), Ok(Found::Empty)));
        std::fs::write(dir.path().join("somefile"), b"x").expect("write");
        assert!(matches!(
            inspect(dir.path()),
            Err(DataDirError::NotACluster(_))
        ));
        assert!(matches!(
            inspect(&dir.path().join("somefile")),
            Err(DataDirError::NotADirectory(_))
        ));
    }

    #[test]
    fn lock_is_exclusive_and_password_is_private() {
        let dir = tempfile::tempdir().expect("tempdir");
        let lock = DirLock::acquire(dir.path()).expect("first lock");
        assert!(matches!(
            DirLock::acquire(dir.path()),
            Err(DataDirError::AlreadyRunning { .. })
        ));
        drop(lock);
        DirLock::acquire(dir.path()).expect("lock again after release");

        let pw = generate_password().expect("password");
        assert_eq!(pw.len(), 20);
        write_password(dir.path(), &pw).expect("write");
        assert_eq!(read_password(dir.path()).expect("read"), Some(pw));
        let mode = std::fs::metadata(dir.path().join(PASSWORD_FILE))
            .expect("stat")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
