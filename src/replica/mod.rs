//! The destination of a sync, behind a small trait so that the apply loop does not know where
//! the replica lives. [`local::LocalReplica`] is a real directory, beneath the root directory
//! that [`root::ReplicaRoot`] holds (and locks) for the whole command.
//!
//! Contract shared by every implementation:
//! - Paths are [`RelPath`]s below the replica root; nothing outside it is ever touched, and no
//!   symlink inside it is followed.
//! - `write_file`, `copy_file`, `symlink` and `hard_link` build the node unnamed or under a
//!   temporary name in the target's directory, set its metadata, and link or rename it into
//!   place: a reader or a crash sees the old node or the new one, never a partial one.
//! - `mkdir` of an existing directory succeeds; `remove` of a missing node succeeds.
//! - Each replica declares what it can do and keep ([`Replica::capabilities`], [`caps`]); an
//!   operation it lacks (a rename on an object store) fails with an error of kind
//!   [`crate::error::ErrorKind::Unsupported`], never a silent emulation, and the planner does
//!   not plan it.
//!
//! The pass reads the replica through the trait too ([`Replica::walk`], [`Replica::hash`],
//! [`Replica::open`], [`Replica::identity`]):
//! - `walk` hands every node below the root to its sink once, in canonical order (the root
//!   first), stat only: a file's hash is unknown unless it is empty. Special files are listed
//!   (so that they get removed). It never follows a symlink and never leaves the root; a local
//!   replica never enters another filesystem mounted inside it (a problem, unknown). A path
//!   that cannot be read is a problem and unknown: nothing at or below it is written.
//! - `hash` reads files by the stable-read protocol: a file that does not hold still while it
//!   is read gets no hash, one that vanished is dropped.
//! - `open` reads a file's current bytes, beneath the root, through no symlink.
//!
//! The `conformance` module (cargo feature `conformance`) checks all of this against any implementation.

pub mod caps;
#[cfg(feature = "conformance")]
pub mod conformance;
pub mod local;
pub mod memory;
pub mod probe;
pub mod root;

use std::io::{self, Read};

pub use caps::Capabilities;

use crate::entry::{Entry, Hash, Kind, Meta, RelPath, Stamp};
use crate::scan::{Tree, Windows};

/// Name prefix of every temporary node dirsync creates inside the replica: staged moves, files
/// being built, the filesystem probe. Such a name at the replica root is always kept in the
/// merged scan, so the next pass removes a leftover (or adopts it by hash).
pub const TMP_PREFIX: &str = ".dirsync-tmp-";

/// How a file's bytes are checked before it is renamed into place. Returning an error aborts
/// the operation and leaves the old node where it was.
pub type Check<'a> = &'a mut dyn FnMut(&Hash, u64) -> io::Result<()>;

/// A file put in place: the hash and length of its bytes, and its stamp.
#[derive(Clone, Copy, Debug)]
pub struct Written {
    pub hash: Hash,
    pub len: u64,
    pub fp: Stamp,
}

pub trait Replica: Sync {
    /// What this replica can do and keep; the planner plans nothing else.
    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
    }
    /// Runs `f`, during which operations on the calling thread may keep the last directory they
    /// opened for the next one. Only for writes of files: nothing may rename or remove a
    /// directory of the replica meanwhile.
    fn batch(&self, f: &mut dyn FnMut()) {
        f()
    }
    /// Renames a file, symlink or whole directory.
    fn rename(&self, from: &RelPath, to: &RelPath) -> io::Result<()>;
    /// Removes a file, symlink, special file or empty directory.
    fn remove(&self, path: &RelPath, kind: Kind) -> io::Result<()>;
    fn mkdir(&self, path: &RelPath) -> io::Result<()>;
    /// Writes `data` to a new file at `path`, hashing it on the way; `check` sees the hash and
    /// length before the file is put in place. Returns both, and the stamp of the file in place.
    fn write_file(
        &self,
        path: &RelPath,
        data: &mut dyn Read,
        meta: &Meta,
        check: Check,
    ) -> io::Result<Written>;
    /// Copies the replica file `from` to `to`, by the kernel where it can (a reflink shares the
    /// bytes). `check` sees the hash and length of the bytes the new file holds, read back or
    /// hashed on the way, never a hash recorded for `from`: a copy source that rotted is
    /// caught before its bytes are put in place under a second name.
    fn copy_file(
        &self,
        from: &RelPath,
        to: &RelPath,
        meta: &Meta,
        check: Check,
    ) -> io::Result<Written>;
    fn symlink(&self, path: &RelPath, target: &[u8], meta: &Meta) -> io::Result<()>;
    /// Returns the stamp of the (shared) inode.
    fn hard_link(&self, leader: &RelPath, path: &RelPath) -> io::Result<Stamp>;
    fn set_meta(&self, path: &RelPath, kind: Kind, meta: &Meta) -> io::Result<()>;
    /// The node's stamp, without following a symlink.
    fn stat(&self, path: &RelPath) -> io::Result<Stamp>;

    /// Walks the whole replica (see the module documentation), handing each entry to `sink`
    /// with the racy windows of the tree as soon as it is known; the returned tree has no
    /// entries, only what else the walk found (problems, unknown paths).
    fn walk(&self, sink: &mut dyn FnMut(&Windows, RelPath, Entry)) -> Tree;
    /// Hashes the files at `which` (indexes into `tree.entries`): each entry is replaced by the
    /// file as it is now, with its hash (none if it did not hold still); a file that vanished
    /// is dropped, one that cannot be read becomes unknown. Returns the entries that got a hash.
    fn hash(&self, tree: &mut Tree, which: &[usize]) -> Vec<(RelPath, Entry)>;
    /// Opens the regular file at `path` to read its bytes as they are now.
    fn open(&self, path: &RelPath) -> io::Result<Box<dyn Read + Send + '_>>;
    /// The (device, inode) of the replica root when it is a directory a local source could
    /// contain (a mount can show it there): the source walk never enters it. `None` for a
    /// replica no local tree can show.
    fn identity(&self) -> Option<(u64, u64)>;
}

/// The whole replica as [`Replica::walk`] sees it, collected into a tree.
pub fn walk_all(replica: &dyn Replica) -> Tree {
    crate::scan::collect(|sink| replica.walk(sink))
}
