//! Walks one tree (the source or the replica): every path with its kind, metadata, stamp
//! ([`Stamp`]) and, where it is needed, its content hash, handed on in canonical order as it is
//! found ([`walk_with`]) or collected into a [`Tree`] ([`walk`]).
//!
//! Invariants:
//! - Symlinks are never followed; the walk stays on the tree it was given.
//! - A cached hash is reused only when the whole stamp (for POSIX: size, mtime, ctime, inode,
//!   device) matches and the cached entry is not racily clean ([`Entry::is_racy`]).
//! - A hash is computed from bytes read between two `fstat`s that agree ([`StableRead`], the one
//!   stable-read protocol, which copies from the source use too); a file that changes while it
//!   is read gets no hash (`None`), so it can never be recorded as synced.
//! - Every file is opened beneath the held root without following a symlink in any component
//!   ([`open_beneath`]); a held source root is opened following no symlink on its canonical path
//!   ([`open_root`]). No read leaves the tree.
//! - A path that could not be read is listed in [`Tree::unknown`]: nothing at or below it may be
//!   deleted or replaced on the strength of this scan.

use std::collections::HashMap;
use std::collections::hash_map::Entry as Slot;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use rustix::fs::{self as rfs, AtFlags, Mode, OFlags};

use crate::entry::{Content, Entry, Meta, RelPath, Stamp, Time};
use crate::hash;

/// Which tree is scanned: the source skips special files with a warning, the replica lists
/// them so that they get removed.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Side {
    Source,
    Replica,
}

/// A path that could not be read, and why.
#[derive(Debug)]
pub struct Problem {
    pub path: PathBuf,
    pub error: io::Error,
}

/// A scanned tree, or the kept part of one: entries sorted in canonical order, the root (empty
/// path) first, and what else the walk found.
#[derive(Debug, Default)]
pub struct Tree {
    pub entries: Vec<(RelPath, Entry)>,
    /// Paths whose state is unknown (unreadable): nothing at or below them is touched.
    pub unknown: Vec<RelPath>,
    /// Special files (FIFOs, sockets, devices) skipped in the source.
    pub specials: Vec<RelPath>,
    pub problems: Vec<Problem>,
    /// The racy windows that apply to this tree's entries.
    pub windows: Windows,
    /// How many files were read to hash them, and their bytes.
    pub hashed_files: u64,
    pub hashed_bytes: u64,
}

impl Tree {
    pub fn get(&self, path: &RelPath) -> Option<&Entry> {
        self.entries
            .binary_search_by(|(p, _)| p.cmp(path))
            .ok()
            .map(|i| &self.entries[i].1)
    }

    /// True if `path` is, or lies below, a path whose state is unknown.
    pub fn is_unknown(&self, path: &RelPath) -> bool {
        self.unknown
            .iter()
            .any(|u| u == path || u.is_ancestor_of(path))
    }

    /// Indexes of files whose content hash is not known.
    pub fn unhashed(&self) -> impl Iterator<Item = usize> + '_ {
        self.entries
            .iter()
            .enumerate()
            .filter(|(_, (_, e))| matches!(e.content, Content::File { hash: None, .. }))
            .map(|(i, _)| i)
    }
}

/// A tree's root, held open by the caller. The walk and the hasher resolve every path beneath
/// `fd` and never through `path` again, so a root that is renamed or replaced by a symlink
/// meanwhile is not followed; `path` only names the tree in messages.
#[derive(Clone, Copy, Debug)]
pub struct Root<'a> {
    pub path: &'a Path,
    pub fd: BorrowedFd<'a>,
}

/// Opens a directory to hold it as a [`Root`] (following symlinks: `path` is canonical).
pub fn open_dir(path: &Path) -> io::Result<OwnedFd> {
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
    rfs::open(path, flags, Mode::empty()).map_err(io_err)
}

/// Opens the canonical path of a tree's root to hold it as a [`Root`] for a pass, following no
/// symlink anywhere on the way (`openat2(RESOLVE_NO_SYMLINKS)`, or `O_NOFOLLOW` on the last
/// component on kernels without it): a canonical path has none, so a symlink met means that
/// the path was changed since it was resolved, and it fails with `ELOOP` instead of opening
/// whatever the symlink names.
pub fn open_root(path: &Path) -> io::Result<OwnedFd> {
    use rustix::fs::ResolveFlags;
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
    let resolve = ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
    match rfs::openat2(rfs::CWD, path, flags, Mode::empty(), resolve) {
        Err(rustix::io::Errno::NOSYS) => {
            rfs::open(path, flags | OFlags::NOFOLLOW, Mode::empty()).map_err(io_err)
        }
        other => other.map_err(io_err),
    }
}

/// Stats every node below `root` without reading file contents. Entries come out in canonical
/// order (no sort needed) with every content hash unknown, except for empty files.
pub fn walk(root: &Path, side: Side) -> Tree {
    match open_dir(root) {
        Ok(fd) => walk_in(
            Root {
                path: root,
                fd: fd.as_fd(),
            },
            side,
        ),
        Err(e) => {
            let mut tree = Tree::default();
            if e.kind() != io::ErrorKind::NotFound {
                tree.problems.push(Problem {
                    path: root.to_path_buf(),
                    error: e,
                });
                tree.unknown.push(RelPath::root());
            }
            tree
        }
    }
}

/// [`walk`] beneath a held root.
pub fn walk_in(root: Root, side: Side) -> Tree {
    collect(|sink| walk_with(root, side, sink))
}

/// Runs a walk that hands its entries to a sink (such as [`walk_with`], `Replica::walk` or
/// `Source::walk`) and collects them into the returned tree.
pub fn collect(walk: impl FnOnce(&mut dyn FnMut(&Windows, RelPath, Entry)) -> Tree) -> Tree {
    let mut entries = Vec::new();
    let mut tree = walk(&mut |_, path, e| entries.push((path, e)));
    debug_assert!(entries.windows(2).all(|p| p[0].0 < p[1].0));
    tree.entries = entries;
    tree
}

/// The same walk, handing each entry to `sink` (with the racy windows of the tree) as soon as
/// it is known instead of keeping it: memory stays bounded by the depth of the tree and the
/// width of one directory. The returned tree has no entries, only what else the walk found.
pub fn walk_with(root: Root, side: Side, sink: &mut dyn FnMut(&Windows, RelPath, Entry)) -> Tree {
    walk_avoiding(root, side, (false, None), sink)
}

/// [`walk_with`] with two guards for the source walk:
/// - `fold_case`, for a replica whose filesystem does not tell names apart by case: names of one
///   directory that differ only in case would land on one replica node, so none of them is
///   handed on; each is a problem and unknown (left as it is in the replica), reported at every
///   pass, instead of a replica that flips between them.
/// - `avoid` (device, inode): a directory never entered, the replica when a mount shows it
///   inside the source, where a sync would copy the replica into itself, one level deeper every
///   pass. It is a problem and unknown, like an unreadable directory.
pub fn walk_avoiding(
    root: Root,
    side: Side,
    (fold_case, avoid): (bool, Option<(u64, u64)>),
    sink: &mut dyn FnMut(&Windows, RelPath, Entry),
) -> Tree {
    let mut w = Walker {
        tree: Tree::default(),
        side,
        fold_case,
        avoid,
        root: root.path,
        seen: Time::now(),
        leaders: HashMap::new(),
        sink,
    };
    // `.` beneath the held descriptor: the same directory, with a listing position of its own.
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
    match rfs::openat(root.fd, ".", flags, Mode::empty())
        .and_then(|fd| rfs::fstat(&fd).map(|st| (fd, st)))
    {
        Ok((fd, st)) => {
            w.tree.windows = Windows {
                root_dev: st.st_dev,
                root_ns: racy_window(fd.as_fd()),
            };
            w.push(RelPath::root(), Content::Dir { tree: None }, &st, None);
            w.dir(fd, &RelPath::root());
        }
        Err(e) => w.problem(RelPath::root(), io_err(e)),
    }
    w.tree
}

/// The racy window for entries on the filesystem of `dir`: fine only where timestamps are known
/// to have nanosecond fields driven by the kernel clock.
fn racy_window(dir: BorrowedFd) -> i128 {
    use linux_magic::*;
    match rfs::fstatfs(dir).map(|s| s.f_type as u32) {
        Ok(TMPFS | EXT4 | BTRFS | XFS) => crate::entry::RACY_WINDOW_FINE_NS,
        _ => crate::entry::RACY_WINDOW_NS,
    }
}

/// `statfs` magic numbers (linux/magic.h).
mod linux_magic {
    pub const TMPFS: u32 = 0x0102_1994;
    pub const EXT4: u32 = 0xEF53;
    pub const BTRFS: u32 = 0x9123_683E;
    pub const XFS: u32 = 0x5846_5342;
}

/// The racy window of the root's filesystem, and the device it applies to; every other device
/// gets the wide window.
#[derive(Clone, Copy, Debug, Default)]
pub struct Windows {
    pub root_dev: u64,
    pub root_ns: i128,
}

impl Windows {
    /// The windows of a tree that is not walked through a local filesystem (an in-memory or
    /// remote backend): `root_ns` for entries of device `root_dev` with sub-second stamps, the
    /// wide window for every other entry.
    pub fn new(root_dev: u64, root_ns: i128) -> Windows {
        Windows { root_dev, root_ns }
    }

    pub fn for_entry(&self, e: &Entry) -> i128 {
        // Whole-second stamps (ext4 with 128-byte inodes says EXT4 too) are coarse whatever the
        // filesystem type: a fine clock gives both zero nanoseconds once in a billion.
        let on_root = e.fp.node().is_some_and(|(dev, _)| dev == self.root_dev);
        if on_root && e.fp.has_fine_times() {
            self.root_ns
        } else {
            crate::entry::RACY_WINDOW_NS
        }
    }
}

/// Takes the hash from the entry the index recorded for the same path, if it is still valid:
/// same stamp, and not racily clean under `window_ns`. Returns whether the record is still
/// worth keeping (false once the path is no longer a file).
pub fn reuse_cached(e: &mut Entry, cached: &Entry, window_ns: i128) -> bool {
    if !matches!(e.content, Content::File { .. }) {
        return false;
    }
    if let (Content::File { hash: h @ None, .. }, Content::File { hash: Some(ch), .. }) =
        (&mut e.content, &cached.content)
        && cached.fp == e.fp
        && !cached.is_racy(window_ns)
    {
        *h = Some(*ch);
        // Keep the time the hash was taken: that is what decides raciness.
        e.seen = cached.seen;
    }
    true
}

/// Gives files that have no valid hash under their path the hash recorded for the same inode
/// under a path that is gone, when the whole stamp still matches: the files of a renamed
/// directory keep inode, size, mtime and ctime, so they need not be read again. Only stamps
/// with a node ([`Stamp::node`], a backend with inodes) take part. Returns the entries that got
/// a hash this way, to be recorded under their new paths.
pub fn reuse_by_inode(tree: &mut Tree, stale: &[(RelPath, Entry)]) -> Vec<(RelPath, Entry)> {
    let windows = tree.windows;
    let by_inode: HashMap<(u64, u64), &Entry> = stale
        .iter()
        .filter(|(_, e)| e.file_hash().is_some())
        .filter_map(|(_, e)| Some((e.fp.node()?, e)))
        .collect();
    if by_inode.is_empty() {
        return Vec::new();
    }
    let mut found = Vec::new();
    for (path, e) in tree.entries.iter_mut() {
        if let Content::File { hash: None, .. } = e.content
            && let Some(cached) = e.fp.node().and_then(|n| by_inode.get(&n))
        {
            let window = windows.for_entry(e);
            reuse_cached(e, cached, window);
            if e.file_hash().is_some() {
                found.push((path.clone(), e.clone()));
            }
        }
    }
    found
}

/// One item of a directory listing: a child (`stat` is its index in the listing's stats), or
/// with `subtree` a child directory's subtree. A child sorts by its name; a subtree sorts by
/// its name followed by '/', which is where its descendants' full paths sort. Names live in
/// one buffer per listing, so that a listing costs a few allocations, not one per child, and
/// sorting moves small items.
#[derive(Clone, Copy)]
struct Item {
    start: u32,
    len: u32,
    stat: u32,
    subtree: bool,
}

impl Item {
    fn name<'n>(&self, names: &'n [u8]) -> &'n [u8] {
        &names[self.start as usize..(self.start + self.len) as usize]
    }
}

/// Compares two listing items as their full paths compare: by name, where a subtree's name is
/// followed by '/'.
fn item_order(names: &[u8], a: &Item, b: &Item) -> std::cmp::Ordering {
    let (an, bn) = (a.name(names), b.name(names));
    let n = an.len().min(bn.len());
    match an[..n].cmp(&bn[..n]) {
        std::cmp::Ordering::Equal => {}
        o => return o,
    }
    // One name is a prefix of the other: compare the next byte of each, if any.
    let next = |name: &[u8], sub: bool| name.get(n).copied().or(sub.then_some(b'/'));
    next(an, a.subtree).cmp(&next(bn, b.subtree))
}

/// A depth-first walk with one open descriptor per level; every `stat` is relative to its
/// directory's descriptor, so no path is resolved twice and no symlink is followed.
struct Walker<'a> {
    tree: Tree,
    side: Side,
    /// See [`walk_avoiding`].
    fold_case: bool,
    /// See [`walk_avoiding`].
    avoid: Option<(u64, u64)>,
    root: &'a Path,
    seen: Time,
    /// The first path (in canonical order) of each file with more than one link.
    leaders: HashMap<(u64, u64), RelPath>,
    sink: &'a mut dyn FnMut(&Windows, RelPath, Entry),
}

impl Walker<'_> {
    fn problem(&mut self, rel: RelPath, error: io::Error) {
        if error.kind() == io::ErrorKind::NotFound {
            return; // Vanished while we looked: simply not there.
        }
        self.tree.problems.push(Problem {
            path: rel.to_path(self.root),
            error,
        });
        self.tree.unknown.push(rel);
    }

    fn push(&mut self, rel: RelPath, content: Content, st: &rfs::Stat, link: Option<RelPath>) {
        let entry = Entry {
            content,
            meta: Meta::of(st),
            fp: Stamp::of(st),
            seen: self.seen,
            link,
        };
        (self.sink)(&self.tree.windows, rel, entry);
    }

    fn dir(&mut self, fd: OwnedFd, rel: &RelPath) {
        let mut dir = match rfs::Dir::new(fd) {
            Ok(d) => d,
            Err(e) => return self.problem(rel.clone(), io_err(e)),
        };
        let (mut names, mut stats, mut items) = (Vec::new(), Vec::new(), Vec::new());
        while let Some(item) = dir.read() {
            let dent = match item {
                Ok(d) => d,
                Err(e) => return self.problem(rel.clone(), io_err(e)),
            };
            let name = dent.file_name();
            let bytes = name.to_bytes();
            if bytes == b"." || bytes == b".." {
                continue;
            }
            let Ok(dfd) = dir.fd() else { continue };
            match rfs::statat(dfd, name, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) => {
                    let node = Item {
                        start: names.len() as u32,
                        len: bytes.len() as u32,
                        stat: stats.len() as u32,
                        subtree: false,
                    };
                    names.extend_from_slice(bytes);
                    if rfs::FileType::from_raw_mode(st.st_mode) == rfs::FileType::Directory {
                        items.push(Item {
                            subtree: true,
                            ..node
                        });
                    }
                    items.push(node);
                    stats.push(st);
                }
                Err(e) => self.problem(rel.join(bytes), io_err(e)),
            }
        }
        items.sort_unstable_by(|a, b| item_order(&names, a, b));
        if self.fold_case {
            self.drop_case_collisions(rel, &names, &mut items);
        }
        let Ok(dfd) = dir.fd() else { return };
        for item in items {
            let child = rel.join(item.name(&names));
            if !item.subtree {
                self.node(dfd, child, &stats[item.stat as usize]);
                continue;
            }
            let st = &stats[item.stat as usize];
            if self.avoid == Some((st.st_dev, st.st_ino)) {
                self.problem(child, replica_inside());
                continue;
            }
            match self.open_subdir(dfd, &child) {
                Ok(fd) => self.dir(fd, &child),
                Err(e) => self.problem(child, e),
            }
        }
    }

    /// Opens a directory of the listing `dfd` to walk it. On the replica side a filesystem
    /// mounted inside the tree (a bind mount too) is not entered: it is not the replica's, so it
    /// is a problem, unknown, and nothing at or below it is removed or written.
    fn open_subdir(&self, dfd: BorrowedFd, child: &RelPath) -> io::Result<OwnedFd> {
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC | OFlags::NOFOLLOW;
        if self.side == Side::Source {
            return rfs::openat(dfd, child.name_os(), flags, Mode::empty()).map_err(io_err);
        }
        let resolve = rustix::fs::ResolveFlags::NO_XDEV | rustix::fs::ResolveFlags::NO_SYMLINKS;
        match rfs::openat2(dfd, child.name_os(), flags, Mode::empty(), resolve) {
            Err(rustix::io::Errno::XDEV) => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "another filesystem is mounted here inside the replica (unmount it, or mount \
                 it elsewhere)",
            )),
            Err(rustix::io::Errno::NOSYS) => {
                rfs::openat(dfd, child.name_os(), flags, Mode::empty()).map_err(io_err)
            }
            other => other.map_err(io_err),
        }
    }

    /// Takes the names of one listing that differ only in case out of `items` (both the node
    /// and its subtree), as problems (see [`walk_avoiding`]).
    fn drop_case_collisions(&mut self, rel: &RelPath, names: &[u8], items: &mut Vec<Item>) {
        let nodes: Vec<&[u8]> = items
            .iter()
            .filter(|i| !i.subtree)
            .map(|i| i.name(names))
            .collect();
        let clash: std::collections::HashSet<Vec<u8>> =
            crate::replica::probe::case_collisions(&nodes)
                .into_iter()
                .map(|k| nodes[k].to_vec())
                .collect();
        if clash.is_empty() {
            return;
        }
        items.retain(|i| !clash.contains(i.name(names)));
        let mut clash: Vec<Vec<u8>> = clash.into_iter().collect();
        clash.sort();
        for name in clash {
            self.tree.problems.push(Problem {
                path: rel.join(&name).to_path(self.root),
                error: case_clash(),
            });
            self.tree.unknown.push(rel.join(&name));
        }
    }

    fn node(&mut self, dfd: BorrowedFd, child: RelPath, st: &rfs::Stat) {
        match rfs::FileType::from_raw_mode(st.st_mode) {
            rfs::FileType::RegularFile => {
                let size = st.st_size as u64;
                // Entries come in canonical order, so the first path seen leads.
                let node = Stamp::of(st).node().filter(|_| st.st_nlink > 1);
                let link = match node {
                    None => None,
                    Some(node) => match self.leaders.entry(node) {
                        Slot::Occupied(o) => Some(o.get().clone()),
                        Slot::Vacant(v) => {
                            v.insert(child.clone());
                            None
                        }
                    },
                };
                let hash = (size == 0).then(hash::empty_hash);
                self.push(child, Content::File { size, hash }, st, link);
            }
            rfs::FileType::Directory => self.push(child, Content::Dir { tree: None }, st, None),
            rfs::FileType::Symlink => match rfs::readlinkat(dfd, child.name_os(), Vec::new()) {
                Ok(t) => {
                    let target = t.into_bytes();
                    self.push(child, Content::Symlink { target }, st, None);
                }
                // Not a symlink any more (or its directory went): another node is there now.
                Err(rustix::io::Errno::INVAL | rustix::io::Errno::NOTDIR) => {
                    self.problem(child, io::Error::other(crate::error::Changed))
                }
                Err(e) => self.problem(child, io_err(e)),
            },
            _ if self.side == Side::Source => self.tree.specials.push(child),
            _ => self.push(child, Content::Special, st, None),
        }
    }
}

/// The problem of a source directory that is the replica (see [`walk_avoiding`]).
pub fn replica_inside() -> io::Error {
    io::Error::new(
        io::ErrorKind::Unsupported,
        "this is the replica, shown inside the source by a mount; it is not copied into itself \
         (unmount it, or mount it elsewhere)",
    )
}

/// The problem of a source name that another of its directory equals but for case (see
/// [`walk_avoiding`]).
pub fn case_clash() -> io::Error {
    io::Error::new(
        io::ErrorKind::Unsupported,
        "another name in its directory differs from it only in case, which the replica's \
         filesystem does not tell apart; neither is replicated (rename one)",
    )
}

fn io_err(e: rustix::io::Errno) -> io::Error {
    io::Error::from_raw_os_error(e.raw_os_error())
}

/// Hashes the files at `which` (indexes into `tree.entries`) in parallel, opening each beneath
/// the held root without following a symlink anywhere on the way. A file that vanished is
/// dropped from the tree; one that cannot be read becomes unknown. Returns the entries that got
/// a hash, for the index.
pub fn hash_files_in(root: Root, tree: &mut Tree, which: &[usize]) -> Vec<(RelPath, Entry)> {
    let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
    let open = |rel: &RelPath| open_beneath(root.fd, rel, flags).map(File::from);
    hash_with(root.path, tree, which, &open)
}

/// [`hash_files_in`] for a tree known by its path only (tests and tools): the root is opened
/// here and held while its files are hashed beneath it.
pub fn hash_files(root: &Path, tree: &mut Tree, which: &[usize]) -> Vec<(RelPath, Entry)> {
    match open_dir(root) {
        Ok(fd) => hash_files_in(
            Root {
                path: root,
                fd: fd.as_fd(),
            },
            tree,
            which,
        ),
        Err(e) => {
            let msg = e.to_string();
            hash_with(root, tree, which, &|_| Err(io::Error::other(msg.clone())))
        }
    }
}

type Opener<'a> = dyn Fn(&RelPath) -> io::Result<File> + Sync + 'a;

fn hash_with(
    root: &Path,
    tree: &mut Tree,
    which: &[usize],
    open: &Opener,
) -> Vec<(RelPath, Entry)> {
    hash_each(root, tree, which, &|path, e| hash_one(open(path), e))
}

/// Hashes one file of a tree: its entry as it is now, with the hash filled in (no hash if it
/// did not hold still while it was read), and the bytes read; `None` if it vanished.
pub type Hasher<'a> = dyn Fn(&RelPath, &Entry) -> HashResult + Sync + 'a;

/// The bookkeeping of every hasher: runs `hash` on the files at `which` (indexes into
/// `tree.entries`) in parallel, puts each new entry in the tree, drops vanished files, makes
/// files that cannot be read unknown (problems named beneath `root`), counts what was read.
/// Returns the entries that got a hash, for the index.
pub fn hash_each(
    root: &Path,
    tree: &mut Tree,
    which: &[usize],
    hash: &Hasher,
) -> Vec<(RelPath, Entry)> {
    let mut fresh = Vec::new();
    let results: Vec<(usize, HashResult)> = which
        .par_iter()
        .map(|&i| {
            let (path, e) = &tree.entries[i];
            (i, hash(path, e))
        })
        .collect();
    let mut drop_idx = Vec::new();
    for (i, r) in results {
        match r {
            Ok(Some((e, n))) => {
                tree.hashed_files += 1;
                tree.hashed_bytes += n;
                if e.file_hash().is_some() {
                    fresh.push((tree.entries[i].0.clone(), e.clone()));
                }
                tree.entries[i].1 = e;
            }
            Ok(None) => drop_idx.push(i),
            Err(error) => {
                let path = tree.entries[i].0.clone();
                tree.problems.push(Problem {
                    path: path.to_path(root),
                    error,
                });
                tree.unknown.push(path);
                drop_idx.push(i);
            }
        }
    }
    if !drop_idx.is_empty() {
        drop_idx.sort_unstable();
        let mut k = 0;
        let mut idx = 0;
        tree.entries.retain(|_| {
            let keep = drop_idx.get(k) != Some(&idx);
            if !keep {
                k += 1;
            }
            idx += 1;
            keep
        });
    }
    fresh
}

/// A file's entry with its hash and the bytes read, or `None` if it vanished.
pub type HashResult = io::Result<Option<(Entry, u64)>>;

/// Reads one file and returns its entry with the hash filled in, or `None` if it vanished or
/// stopped being a regular file. A file that did not hold still while it was read
/// ([`StableRead`]) gets no hash.
fn hash_one(opened: io::Result<File>, old: &Entry) -> HashResult {
    let file = match opened {
        Ok(f) => f,
        Err(e) if vanished(&e) => return Ok(None),
        Err(e) => return Err(e),
    };
    let Some(read) = StableRead::start(file)? else {
        return Ok(None);
    };
    let (h, n) = hash::hash_reader(&mut read.reader(), read.len())?;
    let stable = read.held_still(n)?;
    let e = Entry {
        content: Content::File {
            size: read.len(),
            hash: stable.then_some(h),
        },
        meta: read.meta(),
        fp: read.fingerprint(),
        seen: read.seen,
        link: old.link.clone(),
    };
    Ok(Some((e, n)))
}

/// One read of a regular file that counts only if the file held still while it was read: an
/// `fstat` before the first byte, the bytes up to the size it gave, an `fstat` after, and both
/// `fstat`s must agree and exactly that many bytes must have come
/// ([`StableRead::held_still`]); bytes read from a file that changed meanwhile may be a mix of
/// two versions. The scan's hasher and every copy from the source read files this way.
#[derive(Debug)]
pub struct StableRead {
    file: File,
    before: std::fs::Metadata,
    /// When the file was opened (what decides whether a hash of it is racily clean).
    pub seen: Time,
}

impl StableRead {
    /// Starts a read of `file`, opened just now: takes the first `fstat`. `None` when it is not
    /// a regular file.
    pub fn start(file: File) -> io::Result<Option<StableRead>> {
        let seen = Time::now();
        let before = file.metadata()?;
        if !before.file_type().is_file() {
            return Ok(None);
        }
        Ok(Some(StableRead { file, before, seen }))
    }

    pub fn meta(&self) -> Meta {
        Meta::of_metadata(&self.before)
    }

    pub fn fingerprint(&self) -> Stamp {
        Stamp::of_metadata(&self.before)
    }

    /// The node that was opened: (device, inode).
    pub fn node(&self) -> (u64, u64) {
        (self.before.dev(), self.before.ino())
    }

    pub fn len(&self) -> u64 {
        self.before.size()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Its bytes, up to the size the first `fstat` gave: a file that grew meanwhile fails
    /// [`StableRead::held_still`] anyway, and a small file needs no second read to see its end.
    pub fn reader(&self) -> io::Take<&File> {
        io::Read::take(&self.file, self.len())
    }

    /// Whether the read of `n` bytes counts: all of them came, and the file is as it was when
    /// the read started.
    pub fn held_still(&self, n: u64) -> io::Result<bool> {
        let after = self.file.metadata()?;
        Ok(n == self.len() && Stamp::of_metadata(&after) == self.fingerprint())
    }
}

/// Opens `rel` beneath the directory `dir` with `flags`, following no symlink on the way
/// (`openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`, or one `openat(O_NOFOLLOW)` per component
/// on kernels without it). A symlink met anywhere fails with `ELOOP`.
pub fn open_beneath(dir: BorrowedFd, rel: &RelPath, flags: OFlags) -> io::Result<OwnedFd> {
    use rustix::fs::ResolveFlags;
    let resolve = ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
    match rfs::openat2(dir, rel.as_os_str(), flags, Mode::empty(), resolve) {
        Err(rustix::io::Errno::NOSYS) => {}
        other => return other.map_err(io_err),
    }
    let mut parts = rel.as_bytes().split(|&b| b == b'/').peekable();
    let mut cur: Option<OwnedFd> = None;
    let dir_flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    while let Some(part) = parts.next() {
        let last = parts.peek().is_none();
        let at = cur.as_ref().map_or(dir, |fd| fd.as_fd());
        let name = std::ffi::OsStr::from_bytes(part);
        let fd = rfs::openat(
            at,
            name,
            if last { flags } else { dir_flags },
            Mode::empty(),
        )
        .map_err(io_err)?;
        cur = Some(fd);
    }
    cur.ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "the root itself"))
}

/// Errors that mean the path is simply gone (or was replaced mid-scan).
pub fn vanished(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::NotFound) || e.raw_os_error() == Some(40) // ELOOP: now a symlink
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn names_differing_only_in_case_are_held_back_for_a_case_insensitive_replica() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path();
        std::fs::write(src.join("Read.me"), b"1").unwrap();
        std::fs::create_dir_all(src.join("read.ME/inner")).unwrap();
        std::fs::write(src.join("read.ME/inner/x"), b"2").unwrap();
        std::fs::write(src.join("other"), b"3").unwrap();
        let fd = open_dir(src).unwrap();
        let root = Root {
            path: src,
            fd: fd.as_fd(),
        };
        let mut entries = Vec::new();
        let tree = walk_avoiding(root, Side::Source, (true, None), &mut |_, p, _| {
            entries.push(p.to_string())
        });
        assert_eq!(entries, [".", "other"]);
        let unknown: Vec<String> = tree.unknown.iter().map(|p| p.to_string()).collect();
        assert_eq!(unknown, ["Read.me", "read.ME"]);
        assert_eq!(tree.problems.len(), 2);
        assert!(tree.problems[0].error.to_string().contains("only in case"));
        // Without folding every name is handed on.
        let tree = walk_in(root, Side::Source);
        assert_eq!(tree.entries.len(), 6);
        assert!(tree.unknown.is_empty());
    }

    #[test]
    fn a_held_root_is_walked_and_hashed_after_its_path_becomes_a_symlink() {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path();
        let (dst, victim) = (base.join("dst"), base.join("victim"));
        std::fs::create_dir_all(dst.join("d")).unwrap();
        std::fs::write(dst.join("d/f"), b"mine").unwrap();
        std::fs::write(dst.join("g"), b"mine").unwrap();
        std::fs::create_dir_all(victim.join("d")).unwrap();
        std::fs::write(victim.join("d/f"), b"else").unwrap();
        std::fs::write(victim.join("g"), b"else").unwrap();
        std::fs::write(victim.join("h"), b"else").unwrap();
        let fd = open_dir(&dst).unwrap();
        std::fs::rename(&dst, base.join("dst.old")).unwrap();
        std::os::unix::fs::symlink(&victim, &dst).unwrap();
        let root = Root {
            path: &dst,
            fd: fd.as_fd(),
        };
        let paths =
            |t: &Tree| -> Vec<String> { t.entries.iter().map(|(p, _)| p.to_string()).collect() };
        for _ in 0..2 {
            // Each walk lists the held directory from its start.
            let mut tree = walk_in(root, Side::Replica);
            assert_eq!(paths(&tree), [".", "d", "d/f", "g"]);
            let all: Vec<usize> = tree.unhashed().collect();
            hash_files_in(root, &mut tree, &all);
            let mine = *blake3::hash(b"mine").as_bytes();
            assert_eq!(
                tree.get(&RelPath::from_bytes(b"d/f").unwrap())
                    .unwrap()
                    .file_hash(),
                Some(mine)
            );
            assert_eq!(
                tree.get(&RelPath::from_bytes(b"g").unwrap())
                    .unwrap()
                    .file_hash(),
                Some(mine)
            );
        }
        // A directory inside the held root that became a symlink is not followed either.
        let old = base.join("dst.old");
        let mut tree = walk_in(root, Side::Replica);
        std::fs::rename(old.join("d"), old.join("d.moved")).unwrap();
        std::os::unix::fs::symlink(victim.join("d"), old.join("d")).unwrap();
        let all: Vec<usize> = tree.unhashed().collect();
        hash_files_in(root, &mut tree, &all);
        assert_eq!(
            paths(&tree),
            [".", "d", "g"],
            "d/f is gone, not read through the link"
        );
    }

    /// Names built from the bytes that sort around '/' (0x2f): '-' '.' '0' and 'a', plus one
    /// byte that is not UTF-8.
    fn name() -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(
            prop_oneof![Just(b'-'), Just(b'.'), Just(b'0'), Just(b'a'), Just(0xe9u8)],
            1..4,
        )
        .prop_filter("not . or ..", |n| n != b"." && n != b"..")
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn walk_emits_exactly_the_tree_in_canonical_order(
            paths in proptest::collection::vec((name(), name(), any::<bool>()), 1..30)
        ) {
            use std::os::unix::ffi::OsStrExt;
            let tmp = tempfile::tempdir().unwrap();
            let root = tmp.path();
            let mut want = vec![RelPath::root()];
            for (a, b, nested) in &paths {
                let dir = root.join(std::ffi::OsStr::from_bytes(a));
                if dir.symlink_metadata().is_ok_and(|m| !m.is_dir()) {
                    continue;
                }
                std::fs::create_dir_all(&dir).unwrap();
                want.push(RelPath::from_bytes(a).unwrap());
                if *nested {
                    let f = dir.join(std::ffi::OsStr::from_bytes(b));
                    if f.symlink_metadata().is_err() {
                        std::fs::write(&f, b"x").unwrap();
                    }
                    let mut p = a.clone();
                    p.push(b'/');
                    p.extend_from_slice(b);
                    want.push(RelPath::from_bytes(&p).unwrap());
                }
            }
            want.sort();
            want.dedup();
            let tree = walk(root, Side::Source);
            let got: Vec<RelPath> = tree.entries.iter().map(|(p, _)| p.clone()).collect();
            prop_assert_eq!(got, want);
        }
    }
}
