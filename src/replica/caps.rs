//! What a replica can do and keep, declared by the replica ([`super::Replica::capabilities`]) and
//! read by the pass: the planner plans only operations the replica has, and the source side is
//! compared as the replica can hold it ([`Capabilities::keep`]), so that a replica which keeps
//! less than the source (whole-second times, no modes) never shows a change no sync can make
//! go away.
//!
//! Declared capabilities are what the backend promises by its kind (an object store has no
//! rename); [`super::probe::FsTraits`] is what one filesystem was found to keep by trying it.
//! Where both speak of one thing (timestamp precision), the coarser one wins
//! ([`Capabilities::traits`]).

use super::probe::FsTraits;
use crate::entry::{Entry, Kind, Meta, RelPath, Time};

/// How a node can be renamed within the replica.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rename {
    /// One atomic step, for files and whole directories.
    Atomic,
    /// Not at all: a move is a copy (or a write from the source) and a removal.
    None,
}

/// Whether the replica can copy one of its files to another name without the bytes passing
/// through dirsync.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServerCopy {
    None,
    WholeFile,
    /// Whole files and byte ranges of them.
    Ranges,
}

/// How precisely a node's modification time is kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MtimePrecision {
    /// As a filesystem timestamp, to the nanosecond (or what [`FsTraits`] found).
    Nanos,
    /// Whole seconds (SFTP version 3).
    Seconds,
    /// Exactly, as metadata stored with the object (an object store's user metadata).
    InMetadata,
}

/// Whether directories are nodes of their own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Directories {
    /// With their own metadata.
    Real,
    /// Implied by the names below them, kept as empty marker objects so that an empty directory
    /// survives; they have no metadata of their own.
    Implicit,
}

/// Which names the replica can hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Names {
    /// Any bytes but `/` and NUL.
    Bytes,
    /// Valid UTF-8 only.
    Utf8,
}

/// What one replica can do and keep.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capabilities {
    /// A new file can take the place of an existing one in one atomic step.
    pub atomic_replace: bool,
    pub rename: Rename,
    pub server_copy: ServerCopy,
    pub mtime: MtimePrecision,
    /// Permission bits are kept.
    pub modes: bool,
    /// Owner and group are kept.
    pub owners: bool,
    pub symlinks: bool,
    pub hard_links: bool,
    pub directories: Directories,
    pub names: Names,
    /// Extended attributes are kept (none are replicated yet).
    pub xattrs: bool,
}

impl Default for Capabilities {
    /// A local POSIX filesystem, with owners.
    fn default() -> Self {
        Capabilities::posix(true)
    }
}

/// The mode a replica without modes gives a file, and a directory.
pub const FILE_MODE: u32 = 0o644;
pub const DIR_MODE: u32 = 0o755;

/// The metadata every implicit directory has.
pub const IMPLICIT_DIR_META: Meta = Meta {
    mode: DIR_MODE,
    mtime: Time { sec: 0, nsec: 0 },
    uid: 0,
    gid: 0,
};

impl Capabilities {
    /// A local POSIX filesystem; `owners` says whether owner and group are set (as root).
    pub const fn posix(owners: bool) -> Capabilities {
        Capabilities {
            atomic_replace: true,
            rename: Rename::Atomic,
            server_copy: ServerCopy::Ranges,
            mtime: MtimePrecision::Nanos,
            modes: true,
            owners,
            symlinks: true,
            hard_links: true,
            directories: Directories::Real,
            names: Names::Bytes,
            xattrs: true,
        }
    }

    /// The grain, in nanoseconds, to which the replica keeps times by its kind.
    pub fn mtime_grain_ns(&self) -> u32 {
        match self.mtime {
            MtimePrecision::Nanos | MtimePrecision::InMetadata => 1,
            MtimePrecision::Seconds => 1_000_000_000,
        }
    }

    /// What the probed filesystem `probed` keeps, with the declared timestamp precision: the
    /// coarser of the two grains.
    pub fn traits(&self, probed: FsTraits) -> FsTraits {
        FsTraits {
            mtime_grain_ns: probed.mtime_grain_ns.max(self.mtime_grain_ns()),
            ..probed
        }
    }

    /// `meta` of a node of `kind` as the replica keeps it: times to its declared precision,
    /// [`FILE_MODE`] or [`DIR_MODE`] without modes, [`IMPLICIT_DIR_META`] for an implicit
    /// directory. Owners are left as they are (they are compared only where kept).
    pub fn keep_meta(&self, kind: Kind, meta: Meta) -> Meta {
        if kind == Kind::Dir && self.directories == Directories::Implicit {
            return Meta {
                uid: meta.uid,
                gid: meta.gid,
                ..IMPLICIT_DIR_META
            };
        }
        let mut m = meta;
        m.mtime = FsTraits {
            mtime_grain_ns: self.mtime_grain_ns(),
            ..FsTraits::default()
        }
        .keep(m.mtime);
        if !self.modes {
            m.mode = if kind == Kind::Dir {
                DIR_MODE
            } else {
                FILE_MODE
            };
        }
        m
    }

    /// A source entry as this replica (on a filesystem that keeps `fs`, see [`Self::traits`])
    /// would hold it: its metadata as [`Self::keep_meta`] says, its time to the grain of `fs`,
    /// and no hard-link leader where the replica has no hard links (each link is a file of its
    /// own there).
    pub fn keep(&self, e: &mut Entry, fs: &FsTraits) {
        let kind = e.kind();
        e.meta = self.keep_meta(kind, e.meta);
        e.meta.mtime = fs.keep(e.meta.mtime);
        if !self.hard_links {
            e.link = None;
        }
    }

    /// Why the replica cannot hold the source node `e` at `path`, if it cannot: a symlink on a
    /// replica without them, a name that is not UTF-8 on one that takes UTF-8 only.
    pub fn refuses(&self, path: &RelPath, e: &Entry) -> Option<&'static str> {
        if self.names == Names::Utf8 && std::str::from_utf8(path.as_bytes()).is_err() {
            return Some("its name is not valid UTF-8, and the replica takes UTF-8 names only");
        }
        if !self.symlinks && e.kind() == Kind::Symlink {
            return Some("it is a symlink, and the replica cannot hold symlinks");
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(sec: i64, nsec: u32) -> Time {
        Time { sec, nsec }
    }

    fn meta(mode: u32, mtime: Time) -> Meta {
        Meta {
            mode,
            mtime,
            uid: 7,
            gid: 8,
        }
    }

    #[test]
    fn the_coarser_grain_of_declared_and_probed_wins() {
        let seconds = Capabilities {
            mtime: MtimePrecision::Seconds,
            ..Capabilities::default()
        };
        let fine = FsTraits::default();
        let fat = FsTraits {
            mtime_grain_ns: 2_000_000_000,
            ..FsTraits::default()
        };
        assert_eq!(seconds.traits(fine).mtime_grain_ns, 1_000_000_000);
        assert_eq!(seconds.traits(fat).mtime_grain_ns, 2_000_000_000);
        assert_eq!(Capabilities::default().traits(fine).mtime_grain_ns, 1);
        let in_meta = Capabilities {
            mtime: MtimePrecision::InMetadata,
            ..Capabilities::default()
        };
        assert_eq!(in_meta.traits(fat).mtime_grain_ns, 2_000_000_000);
    }

    #[test]
    fn kept_metadata_follows_the_declared_capabilities() {
        let m = meta(0o4750, t(5, 999));
        assert_eq!(Capabilities::default().keep_meta(Kind::File, m), m);
        let sftp = Capabilities {
            mtime: MtimePrecision::Seconds,
            owners: false,
            ..Capabilities::default()
        };
        assert_eq!(sftp.keep_meta(Kind::File, m), meta(0o4750, t(5, 0)));
        let object = Capabilities {
            modes: false,
            directories: Directories::Implicit,
            ..Capabilities::default()
        };
        assert_eq!(object.keep_meta(Kind::File, m), meta(FILE_MODE, t(5, 999)));
        assert_eq!(
            object.keep_meta(Kind::Dir, m),
            meta(DIR_MODE, IMPLICIT_DIR_META.mtime)
        );
    }

    #[test]
    fn refused_nodes_are_symlinks_and_names_the_replica_cannot_hold() {
        let p = |b: &[u8]| RelPath::from_bytes(b).unwrap();
        let link = Entry {
            content: crate::entry::Content::Symlink {
                target: b"x".to_vec(),
            },
            meta: Meta::default(),
            fp: Default::default(),
            seen: Time::default(),
            link: None,
        };
        let file = Entry {
            content: crate::entry::Content::File {
                size: 0,
                hash: None,
            },
            ..link.clone()
        };
        let object = Capabilities {
            symlinks: false,
            names: Names::Utf8,
            ..Capabilities::default()
        };
        assert!(object.refuses(&p(b"l"), &link).is_some());
        assert!(object.refuses(&p(b"d/\xff"), &file).is_some());
        assert!(object.refuses(&p("é".as_bytes()), &file).is_none());
        assert!(
            Capabilities::default()
                .refuses(&p(b"\xff"), &link)
                .is_none()
        );
    }
}
