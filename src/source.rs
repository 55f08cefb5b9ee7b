//! The tree a pass copies from, behind a small trait so that the engine does not know where
//! it lives: [`LocalSource`] is a directory held open for the pass (a [`Root`]); an in-memory
//! tree ([`crate::replica::memory::MemoryReplica`]) can be a source too.
//!
//! Contract shared by every implementation:
//! - [`Source::walk`] hands every node to the sink once, in canonical order (the root first),
//!   stat only: a file's hash is unknown unless it is empty. Symlinks are listed, never
//!   followed; special files are listed in [`Tree::specials`], not handed on. A path that
//!   cannot be read is a problem and unknown.
//! - No read leaves the source: every file is opened beneath its root, following no symlink in
//!   any component; when the caller names the node the scan saw (device, inode), another node
//!   at the path is not read ([`Changed`]).
//! - [`Source::hash`] and every [`SourceFile`] read a file by the stable-read protocol: the
//!   bytes count only if the file held still while they were read.
//! - A path that is no longer a regular file fails with [`Vanished`] (`NotFound`); one whose
//!   way goes through a symlink or a non-directory now, or that is another node, with
//!   [`Changed`]. Both are retried on the next pass.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::BorrowedFd;

use rustix::fs::OFlags;

use crate::entry::{Entry, Meta, RelPath, Stamp, Time};
use crate::scan::{self, Root, Side, StableRead, Tree, Windows, open_beneath};

/// Where a pass reads what the replica must hold.
pub trait Source: Sync {
    /// Walks the whole source (see the module documentation), handing each entry to `sink`
    /// with the racy windows of the tree as soon as it is known. The returned tree has no
    /// entries, only what else the walk found. Two guards (as [`scan::walk_avoiding`]):
    /// `avoid` is the (device, inode) of a directory never entered (the replica, when a mount
    /// shows it inside the source); with `fold_case`, names of one directory that differ only
    /// in case are held back (problems, unknown) for a replica that cannot tell them apart.
    fn walk(
        &self,
        avoid: Option<(u64, u64)>,
        fold_case: bool,
        sink: &mut dyn FnMut(&Windows, RelPath, Entry),
    ) -> Tree;
    /// Hashes the files at `which` (indexes into `tree.entries`): each entry is replaced by the
    /// file as it is now, with its hash (none if it did not hold still); a file that vanished
    /// is dropped, one that cannot be read becomes unknown. Returns the entries that got a hash.
    fn hash(&self, tree: &mut Tree, which: &[usize]) -> Vec<(RelPath, Entry)>;
    /// Opens the regular file at `path` for copying. `node` is the (device, inode) the scan saw
    /// there, when known: another node fails with [`Changed`].
    fn open(
        &self,
        path: &RelPath,
        node: Option<(u64, u64)>,
    ) -> io::Result<Box<dyn SourceFile + '_>>;
    /// The metadata of the directory at `path` (the root too). Not a directory: an error that
    /// says so.
    fn dir_meta(&self, path: &RelPath) -> io::Result<Meta>;
}

/// A source file opened for copying: one read of its bytes from the start, which counts only
/// if [`SourceFile::check_unchanged`] says the file held still.
pub trait SourceFile {
    /// Its metadata when it was opened (it may have changed since the scan).
    fn meta(&self) -> Meta;
    fn fingerprint(&self) -> Stamp;
    /// When it was opened (what decides whether a hash of it is racily clean).
    fn seen(&self) -> Time;
    fn len(&self) -> u64;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Its bytes, up to [`SourceFile::len`].
    fn reader(&self) -> Box<dyn Read + Send + '_>;
    /// Succeeds only if the read of `n` bytes counts: all came, and the file is as it was when
    /// it was opened. Otherwise fails with [`ChangedWhileCopied`].
    fn check_unchanged(&self, n: u64) -> io::Result<()>;
}

pub use crate::error::{Changed, ChangedWhileCopied, Vanished};

pub fn vanished() -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, Vanished)
}

pub fn changed() -> io::Error {
    io::Error::other(Changed)
}

pub fn is_vanished(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|x| x.is::<Vanished>())
}

pub fn is_changed(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|x| x.is::<Changed>())
}

/// A source directory held open for the pass: every read is beneath its descriptor
/// (`path` only names it in messages).
#[derive(Clone, Copy, Debug)]
pub struct LocalSource<'a> {
    root: Root<'a>,
}

impl<'a> LocalSource<'a> {
    pub fn new(root: Root<'a>) -> LocalSource<'a> {
        LocalSource { root }
    }

    pub fn root(&self) -> Root<'a> {
        self.root
    }
}

impl Source for LocalSource<'_> {
    fn walk(
        &self,
        avoid: Option<(u64, u64)>,
        fold_case: bool,
        sink: &mut dyn FnMut(&Windows, RelPath, Entry),
    ) -> Tree {
        scan::walk_avoiding(self.root, Side::Source, (fold_case, avoid), sink)
    }

    fn hash(&self, tree: &mut Tree, which: &[usize]) -> Vec<(RelPath, Entry)> {
        scan::hash_files_in(self.root, tree, which)
    }

    fn open(
        &self,
        path: &RelPath,
        node: Option<(u64, u64)>,
    ) -> io::Result<Box<dyn SourceFile + '_>> {
        Ok(Box::new(LocalFile::open(self.root.fd, path, node)?))
    }

    fn dir_meta(&self, path: &RelPath) -> io::Result<Meta> {
        let st = if path.is_root() {
            rustix::fs::fstat(self.root.fd)?
        } else {
            let flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
            let fd = open_beneath(self.root.fd, path, flags).map_err(|e| {
                use rustix::io::Errno;
                match e.raw_os_error().map(Errno::from_raw_os_error) {
                    Some(Errno::NOTDIR | Errno::LOOP) => {
                        io::Error::other("not a directory in the source")
                    }
                    _ => e,
                }
            })?;
            rustix::fs::fstat(&fd)?
        };
        Ok(Meta::of(&st))
    }
}

/// A regular file of a local source opened for copying, read by the one stable-read protocol
/// ([`StableRead`]). It is opened beneath the held source root, following no symlink in any
/// component, never blocking on a FIFO that replaced it; and when the scan saw the path, the
/// node opened must be the one it saw. So no byte from outside the source is ever read, however
/// the source's directories are swapped meanwhile.
#[derive(Debug)]
pub struct LocalFile {
    read: StableRead,
}

impl LocalFile {
    /// Opens `path` beneath the directory `root`. `scanned` is the (device, inode) the scan saw
    /// at `path`, when it is known: another node there fails with [`Changed`]. A path that is
    /// no longer a regular file is [`Vanished`]; one whose way is now through a symlink or a
    /// non-directory is [`Changed`].
    pub fn open(
        root: BorrowedFd,
        path: &RelPath,
        scanned: Option<(u64, u64)>,
    ) -> io::Result<LocalFile> {
        let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
        let fd = open_beneath(root, path, flags).map_err(|e| {
            use rustix::io::Errno;
            match e.raw_os_error().map(Errno::from_raw_os_error) {
                _ if e.kind() == io::ErrorKind::NotFound => vanished(),
                Some(Errno::LOOP | Errno::XDEV | Errno::NOTDIR) => changed(),
                _ => e,
            }
        })?;
        let Some(read) = StableRead::start(File::from(fd))? else {
            return Err(vanished());
        };
        if scanned.is_some_and(|node| node != read.node()) {
            return Err(changed());
        }
        Ok(LocalFile { read })
    }
}

impl SourceFile for LocalFile {
    fn meta(&self) -> Meta {
        self.read.meta()
    }

    fn fingerprint(&self) -> Stamp {
        self.read.fingerprint()
    }

    fn seen(&self) -> Time {
        self.read.seen
    }

    fn len(&self) -> u64 {
        self.read.len()
    }

    fn reader(&self) -> Box<dyn Read + Send + '_> {
        Box::new(self.read.reader())
    }

    fn check_unchanged(&self, n: u64) -> io::Result<()> {
        if !self.read.held_still(n)? {
            return Err(io::Error::other(ChangedWhileCopied));
        }
        Ok(())
    }
}
