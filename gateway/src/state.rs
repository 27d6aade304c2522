//! The daemon's record of what it set up, kept in `[node] state_dir`.
//!
//! A clean stop undoes everything and deletes the record. A crash (SIGKILL, OOM, power) leaves
//! the record behind, and the next start reads it and removes what is left before it sets up
//! anything new. A lock file held for the daemon's whole life tells a crashed run (lock free)
//! from a running one (lock held): the kernel releases it however the process ends.

use std::fs::{self, File, OpenOptions};
use std::io::{self, ErrorKind};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

const LOCK_FILE: &str = "gatewayd.lock";
const STATE_FILE: &str = "gatewayd.state";

/// What a run set up that outlives it if it crashes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub pid: u32,
    pub started_at: u64,
    pub socket: PathBuf,
    /// Interfaces the classifier was attached to.
    pub interfaces: Vec<String>,
    /// nftables tables (family inet) the run owns.
    #[serde(default)]
    pub nft_tables: Vec<String>,
    /// Sysctls the run changed, with the values to put back.
    #[serde(default)]
    pub sysctls: Vec<(String, String)>,
    /// Hooks where the run attached programs as legacy TC filters, (interface, egress):
    /// unlike TCX links, those outlive the process.
    #[serde(default)]
    pub tc_hooks: Vec<(String, bool)>,
    /// Interfaces whose clsact qdisc the run added, or was about to add.
    #[serde(default)]
    pub clsact_added: Vec<String>,
    /// The kernel's boot id when the record was written: a record from an earlier boot
    /// describes kernel state that is gone (and old sysctl values a reboot already reset).
    #[serde(default)]
    pub boot_id: String,
}

/// This boot's id (`/proc/sys/kernel/random/boot_id`), or empty if it cannot be read.
pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

impl Record {
    /// Whether the record was written during an earlier boot. A record without a boot id
    /// (written by an older version) is taken as this boot's, as before.
    pub fn from_earlier_boot(&self, now: &str) -> bool {
        !self.boot_id.is_empty() && !now.is_empty() && self.boot_id != now
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("another gatewayd is running with state directory {dir}{}", pid.map(|p| format!(" (pid {p})")).unwrap_or_default())]
    AlreadyRunning { dir: PathBuf, pid: Option<u32> },
    #[error("socket {0} is in use by another process; set a different [node] socket")]
    SocketInUse(PathBuf),
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

fn io_err<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> StateError + use<'a> {
    move |source| StateError::Io {
        action,
        path: path.to_owned(),
        source,
    }
}

/// Ownership of a state directory for as long as it lives.
#[derive(Debug)]
pub struct StateDir {
    dir: PathBuf,
    // Held, never read: dropping it releases the lock.
    _lock: File,
}

impl StateDir {
    /// Takes the directory; returns the record a crashed previous run left, if any.
    pub fn acquire(dir: &Path) -> Result<(Self, Option<Record>), StateError> {
        fs::create_dir_all(dir).map_err(io_err("creating state directory", dir))?;
        let lock_path = dir.join(LOCK_FILE);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_err("opening", &lock_path))?;
        let state_path = dir.join(STATE_FILE);
        if !crate::sys::try_lock_exclusive(&lock).map_err(io_err("locking", &lock_path))? {
            let pid = read_record(&state_path).ok().flatten().map(|r| r.pid);
            return Err(StateError::AlreadyRunning {
                dir: dir.to_owned(),
                pid,
            });
        }
        let leftover = match read_record(&state_path) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(path = %state_path.display(), error = %e, "unreadable state record from a previous run; ignoring it");
                None
            }
        };
        Ok((
            Self {
                dir: dir.to_owned(),
                _lock: lock,
            },
            leftover,
        ))
    }

    /// Writes the record atomically (temp file + rename), so a crash mid-write never leaves a
    /// half record that the next start would misread.
    pub fn write(&self, record: &Record) -> Result<(), StateError> {
        let path = self.dir.join(STATE_FILE);
        let tmp = self.dir.join(format!("{STATE_FILE}.tmp"));
        let text = serde_json::to_vec_pretty(record).map_err(|e| StateError::Io {
            action: "encoding",
            path: path.clone(),
            source: io::Error::other(e),
        })?;
        fs::write(&tmp, text).map_err(io_err("writing", &tmp))?;
        fs::rename(&tmp, &path).map_err(io_err("renaming into", &path))
    }

    /// Deletes the record: called last on a clean stop, once everything in it is undone.
    pub fn clear(&self) -> Result<(), StateError> {
        let path = self.dir.join(STATE_FILE);
        match fs::remove_file(&path) {
            Err(e) if e.kind() != ErrorKind::NotFound => Err(io_err("removing", &path)(e)),
            _ => Ok(()),
        }
    }
}

fn read_record(path: &Path) -> io::Result<Option<Record>> {
    match fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(io::Error::other),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Makes `socket` free to bind: removes a stale socket file that nobody answers on, refuses
/// when a live process still listens there, and leaves any non-socket file alone with an error
/// rather than deleting something that is not ours.
pub fn clear_stale_socket(socket: &Path) -> Result<bool, StateError> {
    let meta = match fs::symlink_metadata(socket) {
        Ok(m) => m,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(io_err("inspecting", socket)(e)),
    };
    if !meta.file_type().is_socket() {
        return Err(StateError::Io {
            action: "refusing to replace",
            path: socket.to_owned(),
            source: io::Error::other("it exists and is not a socket"),
        });
    }
    if UnixStream::connect(socket).is_ok() {
        return Err(StateError::SocketInUse(socket.to_owned()));
    }
    fs::remove_file(socket).map_err(io_err("removing stale socket", socket))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    fn tempdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("gw-state-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    fn record(dir: &Path) -> Record {
        Record {
            pid: 4242,
            started_at: 1,
            socket: dir.join("s.sock"),
            interfaces: vec!["lan0".into()],
            nft_tables: vec!["gateway_t".into()],
            sysctls: vec![("net.ipv4.ip_forward".into(), "0".into())],
            tc_hooks: vec![("lan0".into(), false)],
            clsact_added: vec!["lan0".into()],
            boot_id: "b1".into(),
        }
    }

    #[test]
    fn a_record_from_an_earlier_boot_is_told_apart() {
        let r = record(Path::new("/x"));
        assert!(!r.from_earlier_boot("b1"));
        assert!(r.from_earlier_boot("b2"));
        let old = Record {
            boot_id: String::new(),
            ..r
        };
        assert!(
            !old.from_earlier_boot("b2"),
            "an old record is cleaned as before"
        );
        let text = r#"{"pid":1,"started_at":1,"socket":"/s","interfaces":[]}"#;
        let parsed: Record = serde_json::from_str(text).expect("a record of an older version");
        assert!(parsed.tc_hooks.is_empty() && parsed.boot_id.is_empty());
    }

    #[test]
    fn second_owner_is_refused_while_first_holds_the_dir() {
        let dir = tempdir("lock");
        let (first, leftover) = StateDir::acquire(&dir).expect("first");
        assert!(leftover.is_none());
        first.write(&record(&dir)).expect("write");
        match StateDir::acquire(&dir) {
            Err(StateError::AlreadyRunning { pid, .. }) => assert_eq!(pid, Some(4242)),
            other => panic!("expected AlreadyRunning, got {other:?}"),
        }
        drop(first);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn record_left_by_an_unclean_stop_is_returned_and_a_clean_stop_leaves_none() {
        let dir = tempdir("leftover");
        let (first, _) = StateDir::acquire(&dir).expect("first");
        first.write(&record(&dir)).expect("write");
        drop(first); // like a crash: the lock goes, the record stays
        let (second, leftover) = StateDir::acquire(&dir).expect("second");
        assert_eq!(leftover, Some(record(&dir)));
        second.clear().expect("clear");
        drop(second);
        let (_third, leftover) = StateDir::acquire(&dir).expect("third");
        assert_eq!(leftover, None);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn stale_socket_is_removed_but_a_live_one_is_refused() {
        let dir = tempdir("sock");
        fs::create_dir_all(&dir).expect("mkdir");
        let path = dir.join("s.sock");
        assert!(!clear_stale_socket(&path).expect("absent is fine"));
        let listener = UnixListener::bind(&path).expect("bind");
        assert!(matches!(
            clear_stale_socket(&path),
            Err(StateError::SocketInUse(_))
        ));
        drop(listener); // the file stays, nobody listens: stale
        assert!(clear_stale_socket(&path).expect("stale removed"));
        assert!(!path.exists());
        fs::write(&path, b"not a socket").expect("write");
        assert!(clear_stale_socket(&path).is_err());
        assert!(path.exists(), "a regular file is never deleted");
        let _ = fs::remove_dir_all(&dir);
    }
}
