//! The library's error type. Policy: every error that concerns one path carries that path, and
//! says what the user can do about it. Errors about one entry of a tree never abort a sync: the
//! caller reports them, counts them and goes on (see `apply` and `scan`). Errors about the whole
//! run (bad arguments, a locked or damaged index) are returned before anything is written.

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
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
