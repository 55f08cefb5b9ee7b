//! The library's error type. Policy: every error that concerns one path carries that path, and
//! says what the user can do about it. Errors about one entry of a tree never abort a sync: the
//! caller reports them, counts them and goes on (see `apply` and `scan`). Errors about the whole
//! run (bad arguments, a locked or damaged index) are returned before anything is written.
//!
//! A per-path error is a [`PathError`]: the path, an [`ErrorKind`] a program can act on (retry
//! later, free space, fix permissions) and the English message the terminal and log show.

use std::io;
use std::path::PathBuf;

/// A failure that ends a whole command before or instead of a sync.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("{msg}")]
    BadInput { msg: String },

    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error(
        "the index {path} is in use by another dirsync process syncing the same replica; \
         wait for it to finish or stop it (a `dirsync watch` keeps it until Ctrl-C)"
    )]
    IndexLocked { path: PathBuf },

    #[error(
        "the replica {path} is in use by another dirsync process (it holds the replica's lock, \
         whatever index it uses); wait for it to finish or stop it (a `dirsync watch` keeps it \
         until Ctrl-C)"
    )]
    ReplicaLocked { path: PathBuf },

    #[error(
        "the index {path} cannot be read ({why}); rebuild it from the two trees with \
         `dirsync sync --reindex SRC DST`, or delete the file"
    )]
    IndexDamaged { path: PathBuf, why: String },

    #[error(
        "the index {path} was written by a newer dirsync (index schema {found}; this one reads \
         schemas {oldest} to {known}); run that dirsync, or rebuild the index for this one with \
         `dirsync sync --reindex SRC DST`"
    )]
    IndexTooNew {
        path: PathBuf,
        found: u32,
        oldest: u32,
        known: u32,
    },

    #[error(
        "the index {path} was not closed cleanly (a run was killed, got a second signal, or \
         ran out of disk space for it) and needs a repair, which only a writer can make; the \
         next `dirsync sync` makes it"
    )]
    IndexNeedsRepair { path: PathBuf },

    #[error(
        "the index {path} cannot be written: no space left on the filesystem holding it; free \
         space there and run again (what was already synced stays in place)"
    )]
    IndexFull { path: PathBuf },

    #[error(
        "{path} is a database of another program, not a dirsync index; nothing was written to it; \
         pass another --index path"
    )]
    NotAnIndex { path: PathBuf },

    #[error(
        "the index {path} was made for replica {recorded}, not {given}; pass another --index \
         for this replica, or --reindex to start this index over for it"
    )]
    IndexMismatch {
        path: PathBuf,
        recorded: String,
        given: String,
    },

    #[error("{msg}")]
    Refused { msg: String },
}

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: io::Error) -> Error {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// The kind of this failure, for a caller that reports it against one path.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Io { source, .. } => ErrorKind::of(source),
            Error::IndexFull { .. } => ErrorKind::NoSpace,
            Error::IndexLocked { .. } | Error::ReplicaLocked { .. } => ErrorKind::Transient,
            _ => ErrorKind::Other,
        }
    }
}

/// What went wrong with one path, in terms a caller can act on without reading the message.
/// `status --json` names each as [`ErrorKind::as_str`] says (docs/CLI.md lists them).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The path (or a directory on its way) is not there, or went away while it was synced.
    NotFound,
    /// The filesystem is full, or a quota is used up.
    NoSpace,
    /// The path's permissions, an attribute (immutable, append-only) or a security policy
    /// forbid the access.
    PermissionDenied,
    /// The path changed while it was read, or holds another node than the scan saw: nothing
    /// was taken from it, and the next pass looks again.
    ChangedWhileRead,
    /// The filesystem is mounted read-only.
    ReadOnly,
    /// A condition that may pass by itself (busy, interrupted, timed out, a dropped
    /// connection): the same operation may succeed on the next pass.
    Transient,
    /// The filesystem cannot do what was asked (an operation, a name, a file size).
    Unsupported,
    /// Anything else (an I/O error of the device, a corrupt copy, ...): see the message.
    Other,
}

impl ErrorKind {
    /// The kind's name in JSON output.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::NotFound => "not_found",
            ErrorKind::NoSpace => "no_space",
            ErrorKind::PermissionDenied => "permission_denied",
            ErrorKind::ChangedWhileRead => "changed_while_read",
            ErrorKind::ReadOnly => "read_only",
            ErrorKind::Transient => "transient",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::Other => "other",
        }
    }

    /// The kind of an I/O error: by its OS error code when it has one, else by its
    /// [`io::ErrorKind`] (errors dirsync makes itself say theirs that way, or are classified
    /// by their maker before this, as `apply` does).
    pub fn of(e: &io::Error) -> ErrorKind {
        match e.get_ref() {
            Some(x) if x.is::<Vanished>() => return ErrorKind::NotFound,
            Some(x) if x.is::<Changed>() || x.is::<ChangedWhileCopied>() => {
                return ErrorKind::ChangedWhileRead;
            }
            _ => {}
        }
        match e.raw_os_error() {
            Some(code) => ErrorKind::of_errno(rustix::io::Errno::from_raw_os_error(code)),
            None => ErrorKind::of_io_kind(e.kind()),
        }
    }

    fn of_errno(e: rustix::io::Errno) -> ErrorKind {
        use rustix::io::Errno as E;
        match e {
            E::NOENT | E::NOTDIR => ErrorKind::NotFound,
            E::NOSPC | E::DQUOT => ErrorKind::NoSpace,
            E::ACCESS | E::PERM => ErrorKind::PermissionDenied,
            E::ROFS => ErrorKind::ReadOnly,
            E::AGAIN
            | E::INTR
            | E::BUSY
            | E::TXTBSY
            | E::TIMEDOUT
            | E::CONNRESET
            | E::CONNABORTED
            | E::NETDOWN
            | E::NETUNREACH
            | E::HOSTUNREACH => ErrorKind::Transient,
            E::OPNOTSUPP | E::NOSYS | E::XDEV | E::NAMETOOLONG | E::FBIG | E::ILSEQ => {
                ErrorKind::Unsupported
            }
            _ => ErrorKind::Other,
        }
    }

    fn of_io_kind(k: io::ErrorKind) -> ErrorKind {
        use io::ErrorKind as K;
        match k {
            K::NotFound | K::NotADirectory => ErrorKind::NotFound,
            K::StorageFull | K::QuotaExceeded => ErrorKind::NoSpace,
            K::PermissionDenied => ErrorKind::PermissionDenied,
            K::ReadOnlyFilesystem => ErrorKind::ReadOnly,
            K::Interrupted
            | K::WouldBlock
            | K::TimedOut
            | K::ResourceBusy
            | K::ConnectionReset
            | K::ConnectionAborted => ErrorKind::Transient,
            K::Unsupported | K::CrossesDevices | K::FileTooLarge | K::InvalidFilename => {
                ErrorKind::Unsupported
            }
            _ => ErrorKind::Other,
        }
    }
}

impl std::fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failure about one path that did not stop the pass: what was not done there, and why.
/// It displays as its message, the line the terminal and the log file show.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathError {
    /// The path as messages show it: relative to the replica root for an operation, the full
    /// path for a problem met while scanning.
    pub path: String,
    pub kind: ErrorKind,
    /// The whole English message (it names the path too).
    pub message: String,
}

impl PathError {
    pub fn new(path: impl std::fmt::Display, kind: ErrorKind, message: String) -> PathError {
        PathError {
            path: path.to_string(),
            kind,
            message,
        }
    }
}

impl std::fmt::Display for PathError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

// The payloads of source errors that say what happened, whatever the errno: raised by the
// walker, the source backends and apply, classified by `ErrorKind::of`.

/// A source file that is gone (or is no longer a regular file) since the scan; the only error
/// reported as "vanished from the source".
#[derive(Debug)]
pub struct Vanished;

impl std::fmt::Display for Vanished {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("no longer in the source")
    }
}

impl std::error::Error for Vanished {}

/// A source path that holds another node than the scan saw there, or whose way now goes
/// through a symlink or a non-directory: it is not read, and the next pass scans it again.
#[derive(Debug)]
pub struct Changed;

impl std::fmt::Display for Changed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(
            "another file, directory or symlink is at its path or on its way now; nothing was \
             read from it",
        )
    }
}

impl std::error::Error for Changed {}

/// A source file whose bytes or stat changed while it was copied: what was read is not put in
/// place.
#[derive(Debug)]
pub struct ChangedWhileCopied;

impl std::fmt::Display for ChangedWhileCopied {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("changed while it was being copied")
    }
}

impl std::error::Error for ChangedWhileCopied {}

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::io::Errno;

    fn kind(e: Errno) -> ErrorKind {
        ErrorKind::of(&io::Error::from_raw_os_error(e.raw_os_error()))
    }

    #[test]
    fn os_errors_map_to_their_kinds() {
        use ErrorKind as K;
        let cases = [
            (Errno::NOENT, K::NotFound),
            (Errno::NOTDIR, K::NotFound),
            (Errno::NOSPC, K::NoSpace),
            (Errno::DQUOT, K::NoSpace),
            (Errno::ACCESS, K::PermissionDenied),
            (Errno::PERM, K::PermissionDenied),
            (Errno::ROFS, K::ReadOnly),
            (Errno::AGAIN, K::Transient),
            (Errno::INTR, K::Transient),
            (Errno::BUSY, K::Transient),
            (Errno::TIMEDOUT, K::Transient),
            (Errno::OPNOTSUPP, K::Unsupported),
            (Errno::NOTSUP, K::Unsupported),
            (Errno::XDEV, K::Unsupported),
            (Errno::NAMETOOLONG, K::Unsupported),
            (Errno::IO, K::Other),
            (Errno::INVAL, K::Other),
        ];
        for (errno, want) in cases {
            assert_eq!(kind(errno), want, "{errno:?}");
        }
    }

    #[test]
    fn errors_without_an_os_code_map_by_their_io_kind() {
        let of = |k| ErrorKind::of(&io::Error::new(k, "x"));
        assert_eq!(of(io::ErrorKind::NotFound), ErrorKind::NotFound);
        assert_eq!(of(io::ErrorKind::StorageFull), ErrorKind::NoSpace);
        assert_eq!(of(io::ErrorKind::ReadOnlyFilesystem), ErrorKind::ReadOnly);
        assert_eq!(of(io::ErrorKind::Unsupported), ErrorKind::Unsupported);
        assert_eq!(of(io::ErrorKind::TimedOut), ErrorKind::Transient);
        assert_eq!(ErrorKind::of(&io::Error::other("x")), ErrorKind::Other);
    }

    #[test]
    fn kinds_have_snake_case_names_and_a_path_error_shows_its_message() {
        assert_eq!(ErrorKind::PermissionDenied.as_str(), "permission_denied");
        assert_eq!(
            ErrorKind::ChangedWhileRead.to_string(),
            "changed_while_read"
        );
        let e = PathError::new("a/b", ErrorKind::NotFound, "a/b is gone".into());
        assert_eq!(
            (e.path.as_str(), e.to_string()),
            ("a/b", "a/b is gone".into())
        );
    }
}
