//! A replica in a local directory. Every operation resolves its parent directory relative to a
//! descriptor of the replica root with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`, and
//! acts on the last component with `*at` calls that do not follow symlinks. A symlink planted
//! anywhere in the replica therefore makes the operation fail; it never redirects it outside.
//! The root descriptor is the one the command holds ([`super::root::ReplicaRoot`]), so a
//! replica path renamed or replaced by a symlink meanwhile is not followed either.

use std::cell::RefCell;
use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use rustix::fs::{self as rfs, AtFlags, Mode, OFlags, ResolveFlags, Timespec, Timestamps};

use super::{Capabilities, Check, Replica, TMP_PREFIX, Written};
use crate::entry::{Entry, Hash, Kind, Meta, RelPath, Stamp, Time};
use crate::hash;
use crate::scan::{Tree, Windows};

/// A replica rooted at a directory that exists.
pub struct LocalReplica {
    root: OwnedFd,
    /// Names the root in messages; never opened again.
    path: PathBuf,
    /// Tells this replica's batch apart from another's on the same thread.
    id: u64,
    /// Who owns a file this process creates (when the directory's group is `egid` too).
    euid: u32,
    egid: u32,
    /// Whether owners are set (only root can).
    owners: bool,
    counter: AtomicU64,
    pid: u32,
    /// Whether new files start unnamed (`O_TMPFILE`) and are linked in when complete. Cleared the
    /// first time the filesystem refuses it; every later file then uses a temporary name.
    tmpfile: AtomicBool,
    /// Whether `linkat(AT_EMPTY_PATH)` works (it needs `CAP_DAC_READ_SEARCH`); the link through
    /// `/proc/self/fd` works for everyone but costs a path walk in procfs.
    link_empty_path: AtomicBool,
}

/// A file being written, not yet in place: unnamed (`O_TMPFILE`), or under a temporary name.
struct NewFile {
    file: File,
    tmp: Option<Vec<u8>>,
}

/// A directory descriptor: the root's, borrowed, one opened for a single operation, or the one
/// the current [`Replica::batch`] keeps, with the directory's group.
enum Dir<'a> {
    Root(BorrowedFd<'a>),
    Owned(OwnedFd),
    Kept(Rc<OwnedFd>, u32),
}

impl AsFd for Dir<'_> {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Dir::Root(fd) => *fd,
            Dir::Owned(fd) => fd.as_fd(),
            Dir::Kept(fd, _) => fd.as_fd(),
        }
    }
}

/// The directory a thread's batch keeps open: the path, the descriptor and the directory's group.
type KeptDir = (RelPath, Rc<OwnedFd>, u32);

thread_local! {
    /// `Some` while a batch runs on this thread: the id of its replica and the last directory.
    static BATCH: RefCell<Option<(u64, Option<KeptDir>)>> = const { RefCell::new(None) };
}

static NEXT_ID: AtomicU64 = AtomicU64::new(0);

fn io_err(e: rustix::io::Errno) -> io::Error {
    io::Error::from_raw_os_error(e.raw_os_error())
}

fn os(name: &[u8]) -> &OsStr {
    OsStr::from_bytes(name)
}

fn timespec(t: Time) -> Timespec {
    Timespec {
        tv_sec: t.sec,
        tv_nsec: t.nsec as _,
    }
}

fn times(meta: &Meta) -> Timestamps {
    Timestamps {
        last_access: Timespec {
            tv_sec: 0,
            tv_nsec: rfs::UTIME_OMIT,
        },
        last_modification: timespec(meta.mtime),
    }
}

impl LocalReplica {
    /// Opens the replica root, which must be an existing directory.
    pub fn open(root: &Path, owners: bool) -> io::Result<LocalReplica> {
        let fd = rfs::open(
            root,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(io_err)?;
        Ok(Self::with_root(fd, owners).named(root))
    }

    /// A replica beneath the root the command holds (and has locked, for a writer).
    pub fn held(root: &super::root::ReplicaRoot, owners: bool) -> io::Result<LocalReplica> {
        Ok(Self::with_root(root.try_clone()?, owners).named(root.path()))
    }

    /// Names the root in the messages of a walk or a hash (the path is never opened).
    pub fn named(mut self, path: &Path) -> LocalReplica {
        self.path = path.to_path_buf();
        self
    }

    /// The held root, for the walk and the hasher.
    fn scan_root(&self) -> crate::scan::Root<'_> {
        crate::scan::Root {
            path: &self.path,
            fd: self.root.as_fd(),
        }
    }

    /// A replica beneath the held root directory `root`: every operation resolves beneath it,
    /// never through the replica's path.
    /// What a local replica declares: a POSIX filesystem, with owners when `owners` (as root).
    /// The pass plans with these before the replica is opened; what one filesystem keeps of
    /// times is probed apart ([`super::probe`]).
    pub const fn capabilities_for(owners: bool) -> Capabilities {
        Capabilities::posix(owners)
    }

    pub fn with_root(root: OwnedFd, owners: bool) -> LocalReplica {
        LocalReplica {
            root,
            path: PathBuf::new(),
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            euid: rustix::process::geteuid().as_raw(),
            egid: rustix::process::getegid().as_raw(),
            owners,
            counter: AtomicU64::new(0),
            pid: std::process::id(),
            // Without /proc only CAP_DAC_READ_SEARCH can link an unnamed file; root is likely to.
            tmpfile: AtomicBool::new(
                Path::new("/proc/self/fd").is_dir() || rustix::process::geteuid().is_root(),
            ),
            link_empty_path: AtomicBool::new(true),
        }
    }

    /// For the conformance suite: puts new files in place as a filesystem without `O_TMPFILE`
    /// (`tmpfile: false`) or a process without `CAP_DAC_READ_SEARCH` (`link_empty_path: false`)
    /// must, so that every path is checked on any machine.
    #[cfg(feature = "conformance")]
    #[doc(hidden)]
    pub fn force_fallbacks(&self, tmpfile: bool, link_empty_path: bool) {
        self.tmpfile.fetch_and(tmpfile, Ordering::Relaxed);
        self.link_empty_path
            .fetch_and(link_empty_path, Ordering::Relaxed);
    }

    /// Runs `op`; if it is refused for lack of permission, makes the directories `dirs` writable
    /// for their owner and runs it once more. The plan sets every directory whose entries changed
    /// to its final mode afterwards, so a read-only directory ends read-only again.
    fn writable<T>(
        &self,
        dirs: &[Option<RelPath>],
        op: impl Fn() -> io::Result<T>,
    ) -> io::Result<T> {
        match op() {
            Err(e) if e.raw_os_error() == Some(rustix::io::Errno::ACCESS.raw_os_error()) => {
                // What the user must hear about is the denial, not why it could not be lifted
                // (a directory owned by someone else refuses the chmod with EPERM).
                let mut changed = false;
                for d in dirs.iter().flatten() {
                    let Ok(fd) = self.dir(d) else { return Err(e) };
                    let Ok(st) = rfs::fstat(&fd) else {
                        return Err(e);
                    };
                    if st.st_mode & 0o700 == 0o700 {
                        continue;
                    }
                    let mode = Mode::from_raw_mode((st.st_mode & 0o7777) | 0o700);
                    if rfs::fchmod(&fd, mode).is_err() {
                        return Err(e);
                    }
                    changed = true;
                }
                if changed { op() } else { Err(e) }
            }
            other => other,
        }
    }

    fn remove_once(&self, path: &RelPath, kind: Kind) -> io::Result<()> {
        let (d, name) = self.parent(path)?;
        let flags = if kind == Kind::Dir {
            AtFlags::REMOVEDIR
        } else {
            AtFlags::empty()
        };
        match rfs::unlinkat(&d, os(&name), flags) {
            Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
            Err(e) => Err(io_err(e)),
        }
    }

    fn mkdir_once(&self, path: &RelPath) -> io::Result<()> {
        let (d, name) = self.parent(path)?;
        match rfs::mkdirat(&d, os(&name), Mode::from_raw_mode(0o700)) {
            Ok(()) => Ok(()),
            Err(rustix::io::Errno::EXIST) => {
                let st = rfs::statat(&d, os(&name), AtFlags::SYMLINK_NOFOLLOW).map_err(io_err)?;
                if rfs::FileType::from_raw_mode(st.st_mode) == rfs::FileType::Directory {
                    Ok(())
                } else {
                    Err(io::Error::from(io::ErrorKind::AlreadyExists))
                }
            }
            Err(e) => Err(io_err(e)),
        }
    }

    fn symlink_once(&self, path: &RelPath, target: &[u8], meta: &Meta) -> io::Result<()> {
        let (d, name) = self.parent(path)?;
        let tmp = loop {
            let tmp = self.tmp_name();
            match rfs::symlinkat(os(target), &d, os(&tmp)) {
                Ok(()) => break tmp,
                Err(rustix::io::Errno::EXIST) => continue,
                Err(e) => return Err(io_err(e)),
            }
        };
        let result = (|| {
            if self.owners {
                rfs::chownat(
                    &d,
                    os(&tmp),
                    Some(rustix::fs::Uid::from_raw(meta.uid)),
                    Some(rustix::fs::Gid::from_raw(meta.gid)),
                    AtFlags::SYMLINK_NOFOLLOW,
                )
                .map_err(io_err)?;
            }
            rfs::utimensat(&d, os(&tmp), &times(meta), AtFlags::SYMLINK_NOFOLLOW).map_err(io_err)
        })();
        self.commit(&d, &tmp, &name, result)
    }

    fn hard_link_once(&self, leader: &RelPath, path: &RelPath) -> io::Result<Stamp> {
        let (ld, lname) = self.parent(leader)?;
        let (d, name) = self.parent(path)?;
        let tmp = loop {
            let tmp = self.tmp_name();
            match rfs::linkat(&ld, os(&lname), &d, os(&tmp), AtFlags::empty()) {
                Ok(()) => break tmp,
                Err(rustix::io::Errno::EXIST) => continue,
                Err(e) => return Err(io_err(e)),
            }
        };
        self.commit(&d, &tmp, &name, Ok(()))?;
        // Renaming onto another link of the same inode succeeds without doing anything.
        let _ = rfs::unlinkat(&d, os(&tmp), AtFlags::empty());
        let st = rfs::statat(&d, os(&name), AtFlags::SYMLINK_NOFOLLOW).map_err(io_err)?;
        Ok(Stamp::of(&st))
    }

    /// The directory holding `path`, opened beneath the root without following symlinks.
    fn parent(&self, path: &RelPath) -> io::Result<(Dir<'_>, Vec<u8>)> {
        let parent = path.parent().ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, "the replica root itself")
        })?;
        let name = path.name().to_vec();
        Ok((self.dir(&parent)?, name))
    }

    fn dir(&self, path: &RelPath) -> io::Result<Dir<'_>> {
        if path.is_root() {
            return Ok(Dir::Root(self.root.as_fd()));
        }
        let batch = BATCH.with_borrow(|b| match b {
            Some((id, _)) if *id != self.id => None,
            Some((_, Some((p, fd, gid)))) if p == path => Some(Ok(Dir::Kept(fd.clone(), *gid))),
            Some(_) => Some(Err(())),
            None => None,
        });
        match batch {
            None => self.open_dir(path),
            Some(Ok(kept)) => Ok(kept),
            Some(Err(())) => {
                let fd = match self.open_dir(path)? {
                    Dir::Owned(fd) => Rc::new(fd),
                    other => return Ok(other),
                };
                // The group matters only where owners are set.
                let gid = match self.owners {
                    true => rfs::fstat(&*fd).map_err(io_err)?.st_gid,
                    false => u32::MAX,
                };
                BATCH.with_borrow_mut(|b| {
                    *b = Some((self.id, Some((path.clone(), fd.clone(), gid))));
                });
                Ok(Dir::Kept(fd, gid))
            }
        }
    }

    /// A batch is for writes only; should anything else run in one, it keeps no directory.
    fn forget_kept_dir(&self) {
        BATCH.with_borrow_mut(|b| {
            if let Some((_, kept)) = b {
                *kept = None;
            }
        });
    }

    fn open_dir(&self, path: &RelPath) -> io::Result<Dir<'_>> {
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC | OFlags::NOFOLLOW;
        // Never through a filesystem mounted inside the replica (`EXDEV`): it is not ours.
        let resolve = ResolveFlags::BENEATH
            | ResolveFlags::NO_SYMLINKS
            | ResolveFlags::NO_MAGICLINKS
            | ResolveFlags::NO_XDEV;
        match rfs::openat2(&self.root, path.as_os_str(), flags, Mode::empty(), resolve) {
            Ok(fd) => Ok(Dir::Owned(fd)),
            Err(rustix::io::Errno::NOSYS) => self.dir_by_components(path),
            Err(e) => Err(io_err(e)),
        }
    }

    /// For kernels without `openat2`: one `openat(O_NOFOLLOW)` per component.
    fn dir_by_components(&self, path: &RelPath) -> io::Result<Dir<'_>> {
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC | OFlags::NOFOLLOW;
        let mut cur: Option<OwnedFd> = None;
        for part in path.as_bytes().split(|&b| b == b'/') {
            let next = match &cur {
                None => rfs::openat(&self.root, os(part), flags, Mode::empty()),
                Some(fd) => rfs::openat(fd, os(part), flags, Mode::empty()),
            }
            .map_err(io_err)?;
            cur = Some(next);
        }
        Ok(cur.map_or(Dir::Root(self.root.as_fd()), Dir::Owned))
    }

    fn tmp_name(&self) -> Vec<u8> {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        format!("{TMP_PREFIX}{}-{n}", self.pid).into_bytes()
    }

    /// Creates an empty temporary file in `dir`.
    fn create_tmp(&self, dir: &Dir) -> io::Result<(File, Vec<u8>)> {
        loop {
            let name = self.tmp_name();
            let flags =
                OFlags::RDWR | OFlags::CREATE | OFlags::EXCL | OFlags::CLOEXEC | OFlags::NOFOLLOW;
            match rfs::openat(dir, os(&name), flags, Mode::from_raw_mode(0o600)) {
                Ok(fd) => return Ok((File::from(fd), name)),
                Err(rustix::io::Errno::EXIST) => continue,
                Err(e) => return Err(io_err(e)),
            }
        }
    }

    /// Creates an empty file in `dir` that is not in place yet: unnamed where the filesystem
    /// supports `O_TMPFILE`, else under a temporary name. It is open for reading too, so that a
    /// copy can be read back before it is put in place.
    fn create_new(&self, dir: &Dir) -> io::Result<NewFile> {
        if self.tmpfile.load(Ordering::Relaxed) {
            let flags = OFlags::RDWR | OFlags::TMPFILE | OFlags::CLOEXEC;
            match rfs::openat(dir, ".", flags, Mode::from_raw_mode(0o600)) {
                Ok(fd) => {
                    return Ok(NewFile {
                        file: File::from(fd),
                        tmp: None,
                    });
                }
                // Not supported by this filesystem (or kernel): temporary names from now on.
                Err(
                    rustix::io::Errno::OPNOTSUPP
                    | rustix::io::Errno::ISDIR
                    | rustix::io::Errno::INVAL
                    | rustix::io::Errno::NOSYS,
                ) => self.tmpfile.store(false, Ordering::Relaxed),
                Err(e) => return Err(io_err(e)),
            }
        }
        let (file, tmp) = self.create_tmp(dir)?;
        Ok(NewFile {
            file,
            tmp: Some(tmp),
        })
    }

    /// Gives the unnamed file `f` the name `name` in `dir`. A name that is taken is replaced
    /// atomically: the file is linked under a temporary name and renamed over it.
    fn link_new(&self, dir: &Dir, f: &File, name: &[u8]) -> io::Result<()> {
        let link = |to: &[u8]| {
            if self.link_empty_path.load(Ordering::Relaxed) {
                match rfs::linkat(f, "", dir, os(to), AtFlags::EMPTY_PATH) {
                    // Refused without CAP_DAC_READ_SEARCH: through /proc from now on.
                    Err(rustix::io::Errno::NOENT | rustix::io::Errno::PERM) => {
                        self.link_empty_path.store(false, Ordering::Relaxed)
                    }
                    other => return other,
                }
            }
            // The magic link names exactly the open inode; only `dir` and `to` are in the replica.
            let proc = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(f));
            rfs::linkat(
                rfs::CWD,
                proc.as_str(),
                dir,
                os(to),
                AtFlags::SYMLINK_FOLLOW,
            )
        };
        match link(name) {
            Ok(()) => Ok(()),
            Err(rustix::io::Errno::EXIST) => {
                let tmp = loop {
                    let tmp = self.tmp_name();
                    match link(&tmp) {
                        Ok(()) => break tmp,
                        Err(rustix::io::Errno::EXIST) => continue,
                        Err(e) => return Err(io_err(e)),
                    }
                };
                self.commit(dir, &tmp, name, Ok(()))
            }
            Err(e) => Err(io_err(e)),
        }
    }

    /// Sets owner, mode and mtime on a new file in `dir` (owner first: chown clears setuid).
    fn finish_file(&self, dir: &Dir, f: &File, meta: &Meta) -> io::Result<()> {
        // A new file is ours, with our group or the directory's: both egid here, whatever the
        // setgid bit or mount options say.
        let ours = matches!(dir, Dir::Kept(_, gid) if *gid == self.egid)
            && (meta.uid, meta.gid) == (self.euid, self.egid);
        if self.owners && !ours {
            rfs::fchown(
                f,
                Some(rustix::fs::Uid::from_raw(meta.uid)),
                Some(rustix::fs::Gid::from_raw(meta.gid)),
            )
            .map_err(io_err)?;
        }
        rfs::fchmod(f, Mode::from_raw_mode(meta.mode)).map_err(io_err)?;
        rfs::futimens(f, &times(meta)).map_err(io_err)?;
        Ok(())
    }

    /// Renames `tmp` over `name` in `dir`, or removes `tmp` if `result` is an error.
    fn commit<T>(
        &self,
        dir: &Dir,
        tmp: &[u8],
        name: &[u8],
        result: io::Result<T>,
    ) -> io::Result<T> {
        match result {
            Ok(v) => match rfs::renameat(dir, os(tmp), dir, os(name)) {
                Ok(()) => Ok(v),
                Err(e) => {
                    let _ = rfs::unlinkat(dir, os(tmp), AtFlags::empty());
                    Err(io_err(e))
                }
            },
            Err(e) => {
                let _ = rfs::unlinkat(dir, os(tmp), AtFlags::empty());
                Err(e)
            }
        }
    }

    /// Fills a new file, sets its metadata, and puts it in place as `name` in `dir`. Returns
    /// what `fill` wrote and the fingerprint of the file in place.
    fn write_into(
        &self,
        dir: &Dir,
        new: NewFile,
        name: &[u8],
        meta: &Meta,
        fill: impl FnOnce(&mut File) -> io::Result<(Hash, u64)>,
    ) -> io::Result<Written> {
        let NewFile { mut file, tmp } = new;
        let result = fill(&mut file).and_then(|r| {
            self.finish_file(dir, &file, meta)?;
            Ok(r)
        });
        let (hash, len) = match &tmp {
            Some(tmp) => self.commit(dir, tmp, name, result)?,
            // An unnamed file that fails simply vanishes when it is closed.
            None => {
                let r = result?;
                self.link_new(dir, &file, name)?;
                r
            }
        };
        // After it is in place: a link or rename changes the inode's ctime.
        let st = rfs::fstat(&file).map_err(io_err)?;
        Ok(Written {
            hash,
            len,
            fp: Stamp::of(&st),
        })
    }

    /// chmod without following a symlink at the last component.
    fn chmod_nofollow(&self, dir: &Dir, name: &[u8], mode: u32) -> io::Result<()> {
        let flags = OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let fd = rfs::openat(dir, os(name), flags, Mode::empty()).map_err(io_err)?;
        let st = rfs::fstat(&fd).map_err(io_err)?;
        if rfs::FileType::from_raw_mode(st.st_mode) == rfs::FileType::Symlink {
            return Ok(());
        }
        // The descriptor pins the inode; the magic link names exactly it.
        let proc = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&fd));
        rfs::chmod(proc.as_str(), Mode::from_raw_mode(mode)).map_err(io_err)
    }
}

impl Replica for LocalReplica {
    fn capabilities(&self) -> Capabilities {
        Self::capabilities_for(self.owners)
    }

    fn batch(&self, f: &mut dyn FnMut()) {
        /// Ends the batch (closing the kept directory) even if `f` panics.
        struct End;
        impl Drop for End {
            fn drop(&mut self) {
                BATCH.with_borrow_mut(|b| *b = None);
            }
        }
        let outer = BATCH.with_borrow_mut(|b| b.replace((self.id, None)));
        assert!(outer.is_none(), "batches do not nest");
        let _end = End;
        f();
    }

    fn rename(&self, from: &RelPath, to: &RelPath) -> io::Result<()> {
        self.forget_kept_dir();
        self.writable(&[from.parent(), to.parent()], || {
            let (fd, fname) = self.parent(from)?;
            let (td, tname) = self.parent(to)?;
            rfs::renameat(&fd, os(&fname), &td, os(&tname)).map_err(io_err)
        })
    }

    fn remove(&self, path: &RelPath, kind: Kind) -> io::Result<()> {
        self.forget_kept_dir();
        self.writable(&[path.parent()], || self.remove_once(path, kind))
    }

    fn mkdir(&self, path: &RelPath) -> io::Result<()> {
        // The root is the directory held open: it exists.
        if path.is_root() {
            return Ok(());
        }
        self.writable(&[path.parent()], || self.mkdir_once(path))
    }

    fn write_file(
        &self,
        path: &RelPath,
        data: &mut dyn Read,
        meta: &Meta,
        check: Check,
    ) -> io::Result<Written> {
        let (d, name) = self.parent(path)?;
        let new = self.writable(&[path.parent()], || self.create_new(&d))?;
        self.write_into(&d, new, &name, meta, |f| {
            let (h, n) = hash::copy_hashing(data, f)?;
            check(&h, n)?;
            Ok((h, n))
        })
    }
    fn copy_file(
        &self,
        from: &RelPath,
        to: &RelPath,
        meta: &Meta,
        check: Check,
    ) -> io::Result<Written> {
        let (fd, fname) = self.parent(from)?;
        let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
        let src = File::from(rfs::openat(&fd, os(&fname), flags, Mode::empty()).map_err(io_err)?);
        let st = rfs::fstat(&src).map_err(io_err)?;
        if rfs::FileType::from_raw_mode(st.st_mode) != rfs::FileType::RegularFile {
            return Err(io::Error::other("copy source is not a regular file"));
        }
        let len = st.st_size as u64;
        let (td, tname) = self.parent(to)?;
        let new = self.writable(&[to.parent()], || self.create_new(&td))?;
        self.write_into(&td, new, &tname, meta, |f| {
            kernel_copy(&src, f, len)?;
            // What the new file holds, as the filesystem returns it: a reflink shares a rotten
            // extent, `copy_file_range` copies it, and either way the hash shows it.
            f.seek(SeekFrom::Start(0))?;
            let (h, n) = hash::hash_reader(&mut &*f, len)?;
            check(&h, n)?;
            Ok((h, n))
        })
    }

    fn symlink(&self, path: &RelPath, target: &[u8], meta: &Meta) -> io::Result<()> {
        self.writable(&[path.parent()], || self.symlink_once(path, target, meta))
    }

    fn hard_link(&self, leader: &RelPath, path: &RelPath) -> io::Result<Stamp> {
        self.writable(&[path.parent()], || self.hard_link_once(leader, path))
    }

    fn set_meta(&self, path: &RelPath, kind: Kind, meta: &Meta) -> io::Result<()> {
        if path.is_root() {
            let fd = self.root.as_fd();
            if self.owners {
                rfs::fchown(
                    fd,
                    Some(rustix::fs::Uid::from_raw(meta.uid)),
                    Some(rustix::fs::Gid::from_raw(meta.gid)),
                )
                .map_err(io_err)?;
            }
            rfs::fchmod(fd, Mode::from_raw_mode(meta.mode)).map_err(io_err)?;
            return rfs::futimens(fd, &times(meta)).map_err(io_err);
        }
        let (d, name) = self.parent(path)?;
        if self.owners {
            rfs::chownat(
                &d,
                os(&name),
                Some(rustix::fs::Uid::from_raw(meta.uid)),
                Some(rustix::fs::Gid::from_raw(meta.gid)),
                AtFlags::SYMLINK_NOFOLLOW,
            )
            .map_err(io_err)?;
        }
        if kind != Kind::Symlink {
            self.chmod_nofollow(&d, &name, meta.mode)?;
        }
        rfs::utimensat(&d, os(&name), &times(meta), AtFlags::SYMLINK_NOFOLLOW).map_err(io_err)
    }

    fn stat(&self, path: &RelPath) -> io::Result<Stamp> {
        if path.is_root() {
            return Ok(Stamp::of(&rfs::fstat(&self.root).map_err(io_err)?));
        }
        let (d, name) = self.parent(path)?;
        let st = rfs::statat(&d, os(&name), AtFlags::SYMLINK_NOFOLLOW).map_err(io_err)?;
        Ok(Stamp::of(&st))
    }

    fn walk(&self, sink: &mut dyn FnMut(&Windows, RelPath, Entry)) -> Tree {
        crate::scan::walk_with(self.scan_root(), crate::scan::Side::Replica, sink)
    }

    fn hash(&self, tree: &mut Tree, which: &[usize]) -> Vec<(RelPath, Entry)> {
        crate::scan::hash_files_in(self.scan_root(), tree, which)
    }

    fn open(&self, path: &RelPath) -> io::Result<Box<dyn Read + Send + '_>> {
        let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
        let file = File::from(crate::scan::open_beneath(self.root.as_fd(), path, flags)?);
        if !file.metadata()?.is_file() {
            return Err(io::Error::other("not a regular file in the replica"));
        }
        Ok(Box::new(file))
    }

    fn identity(&self) -> Option<(u64, u64)> {
        rfs::fstat(&self.root).ok().map(|st| (st.st_dev, st.st_ino))
    }
}

/// Copies `len` bytes in the kernel: a reflink where the filesystem shares extents, else
/// `copy_file_range`, else a plain read/write loop. The caller reads the result back.
fn kernel_copy(src: &File, dst: &mut File, len: u64) -> io::Result<u64> {
    if rfs::ioctl_ficlone(&*dst, src).is_ok() {
        return Ok(len);
    }
    let mut done = 0u64;
    let (mut off_in, mut off_out) = (0u64, 0u64);
    loop {
        let want = (len.saturating_sub(done)).clamp(1, 1 << 30) as usize;
        match rfs::copy_file_range(src, Some(&mut off_in), &*dst, Some(&mut off_out), want) {
            Ok(0) => return Ok(done),
            Ok(n) => done += n as u64,
            Err(rustix::io::Errno::INTR) => continue,
            Err(
                rustix::io::Errno::XDEV
                | rustix::io::Errno::INVAL
                | rustix::io::Errno::NOSYS
                | rustix::io::Errno::OPNOTSUPP,
            ) if done == 0 => {
                let mut s = src;
                let n = io::copy(&mut s, dst)?;
                dst.flush()?;
                return Ok(n);
            }
            Err(e) => return Err(io_err(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    fn p(s: &str) -> RelPath {
        RelPath::from_bytes(s.as_bytes()).unwrap()
    }

    fn meta(mode: u32, sec: i64) -> Meta {
        Meta {
            mode,
            mtime: Time { sec, nsec: 7 },
            uid: 0,
            gid: 0,
        }
    }

    /// The three ways a new file can be put in place: (O_TMPFILE, linkat(AT_EMPTY_PATH)).
    const MODES: [(&str, bool, bool); 3] = [
        ("O_TMPFILE, AT_EMPTY_PATH", true, true),
        ("O_TMPFILE, /proc", true, false),
        ("temporary name", false, false),
    ];

    fn replica(root: &Path, (_, tmpfile, empty_path): (&str, bool, bool)) -> LocalReplica {
        let r = LocalReplica::open(root, false).unwrap();
        r.tmpfile.store(tmpfile, Ordering::Relaxed);
        r.link_empty_path.store(empty_path, Ordering::Relaxed);
        r
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    }

    fn write(r: &LocalReplica, path: &str, data: &[u8], m: &Meta) -> io::Result<Written> {
        r.write_file(&p(path), &mut &data[..], m, &mut |_, _| Ok(()))
    }

    fn assert_written(root: &Path, path: &str, w: &Written, data: &[u8], m: &Meta) {
        let f = root.join(path);
        assert_eq!(std::fs::read(&f).unwrap(), data);
        let md = std::fs::symlink_metadata(&f).unwrap();
        assert_eq!(md.permissions().mode() & 0o7777, m.mode);
        assert_eq!((md.mtime(), md.mtime_nsec()), (m.mtime.sec, 7));
        assert_eq!(w.hash, *blake3::hash(data).as_bytes());
        assert_eq!(w.len, data.len() as u64);
        assert_eq!(
            w.fp,
            Stamp::of_metadata(&md),
            "fingerprint of the file in place"
        );
    }

    #[test]
    fn a_held_root_is_written_beneath_after_its_path_becomes_a_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let (dst, old, victim) = (
            dir.path().join("dst"),
            dir.path().join("dst.old"),
            dir.path().join("victim"),
        );
        std::fs::create_dir(&dst).unwrap();
        std::fs::create_dir(&victim).unwrap();
        let fd = rfs::open(&dst, OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty()).unwrap();
        let r = LocalReplica::with_root(fd, false);
        std::fs::rename(&dst, &old).unwrap();
        std::os::unix::fs::symlink(&victim, &dst).unwrap();
        r.mkdir(&p("d")).unwrap();
        write(&r, "d/f", b"x", &meta(0o644, 1)).unwrap();
        assert_eq!(names(&old), ["d"]);
        assert_eq!(names(&old.join("d")), ["f"]);
        assert!(names(&victim).is_empty());
    }

    #[test]
    fn new_and_replaced_files_land_whole_in_every_mode() {
        for mode in MODES {
            let (how, dir) = (mode.0, tempfile::tempdir().unwrap());
            let root = dir.path();
            let r = replica(root, mode);
            r.mkdir(&p("d")).unwrap();
            let (m1, m2) = (meta(0o640, 1_000_000), meta(0o604, 2_000_000));
            let w = write(&r, "d/f", b"first", &m1).unwrap();
            assert_written(root, "d/f", &w, b"first", &m1);
            let w = write(&r, "d/f", b"second version", &m2).unwrap();
            assert_written(root, "d/f", &w, b"second version", &m2);
            let w = write(&r, "top", b"", &m1).unwrap();
            assert_written(root, "top", &w, b"", &m1);
            assert_eq!(names(root), ["d", "top"], "{how}");
            if mode.1 && !r.tmpfile.load(Ordering::Relaxed) {
                eprintln!(
                    "{}: no O_TMPFILE here, only the fallback was tested",
                    root.display()
                );
            }
            assert_eq!(names(&root.join("d")), ["f"], "{how}");
        }
    }

    #[test]
    fn a_refused_file_leaves_nothing_and_keeps_the_old_one() {
        for mode in MODES {
            let (how, dir) = (mode.0, tempfile::tempdir().unwrap());
            let root = dir.path();
            let r = replica(root, mode);
            write(&r, "old", b"kept", &meta(0o644, 5)).unwrap();
            for target in ["old", "new"] {
                let e = r
                    .write_file(
                        &p(target),
                        &mut &b"changed"[..],
                        &meta(0o644, 6),
                        &mut |_, _| Err(io::Error::other("changed while copied")),
                    )
                    .unwrap_err();
                assert_eq!(e.to_string(), "changed while copied");
            }
            assert_eq!(names(root), ["old"], "{how}");
            assert_eq!(std::fs::read(root.join("old")).unwrap(), b"kept");
        }
    }

    #[test]
    fn copies_land_whole_in_every_mode() {
        for mode in MODES {
            let (how, dir) = (mode.0, tempfile::tempdir().unwrap());
            let root = dir.path();
            let r = replica(root, mode);
            let m = meta(0o600, 9);
            write(&r, "a", b"payload", &m).unwrap();
            let c = r
                .copy_file(&p("a"), &p("b"), &m, &mut |_, _| Ok(()))
                .unwrap();
            assert_written(root, "b", &c, b"payload", &m);
            // Over an existing file.
            let c = r
                .copy_file(&p("a"), &p("b"), &m, &mut |_, _| Ok(()))
                .unwrap();
            assert_written(root, "b", &c, b"payload", &m);
            assert_eq!(names(root), ["a", "b"], "{how}");
        }
    }

    /// The copy source rotted after it was hashed: `check` sees the hash of the rotten bytes
    /// (what the new file holds), refuses it, and nothing is put in place.
    #[test]
    fn a_copy_is_checked_by_the_hash_of_its_own_bytes() {
        for mode in MODES {
            let (how, dir) = (mode.0, tempfile::tempdir().unwrap());
            let root = dir.path();
            let r = replica(root, mode);
            let m = meta(0o600, 9);
            // Large enough to be hashed in parallel blocks.
            let data: Vec<u8> = (0..9u32 << 20).map(|i| (i ^ (i >> 13)) as u8).collect();
            let w = write(&r, "a", &data, &m).unwrap();
            let mut rotten = data.clone();
            rotten[5 << 20] ^= 1;
            std::fs::write(root.join("a"), &rotten).unwrap();
            let mut seen = None;
            let e = r
                .copy_file(&p("a"), &p("b"), &m, &mut |h, n| {
                    seen = Some((*h, n));
                    if *h == w.hash {
                        Ok(())
                    } else {
                        Err(io::Error::other("rotten"))
                    }
                })
                .unwrap_err();
            assert_eq!(e.to_string(), "rotten", "{how}");
            let want = (*blake3::hash(&rotten).as_bytes(), rotten.len() as u64);
            assert_eq!(seen, Some(want), "{how}");
            assert_eq!(names(root), ["a"], "{how}");
        }
    }

    #[test]
    fn a_name_taken_by_a_directory_is_an_error_and_leaves_no_temporary() {
        for mode in MODES {
            let (how, dir) = (mode.0, tempfile::tempdir().unwrap());
            let root = dir.path();
            let r = replica(root, mode);
            r.mkdir(&p("d")).unwrap();
            assert!(write(&r, "d", b"x", &meta(0o644, 1)).is_err(), "{how}");
            assert_eq!(names(root), ["d"], "{how}");
        }
    }

    #[test]
    fn a_batch_keeps_directories_and_owners_still_come_out_right() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let is_root = rustix::process::geteuid().is_root();
        let r = LocalReplica::open(root, is_root).unwrap();
        let (uid, gid) = (r.euid, r.egid);
        r.mkdir(&p("a")).unwrap();
        r.mkdir(&p("s")).unwrap();
        if is_root {
            // A setgid directory of another group: a new file would get that group.
            std::os::unix::fs::chown(root.join("s"), None, Some(4242)).unwrap();
            std::fs::set_permissions(root.join("s"), PermissionsExt::from_mode(0o2775)).unwrap();
        }
        let ours = Meta {
            uid,
            gid,
            ..meta(0o644, 3)
        };
        let theirs = Meta {
            uid: 1234,
            gid: 5678,
            ..meta(0o644, 3)
        };
        let files = [
            ("a/1", ours),
            ("a/2", theirs),
            ("s/1", ours),
            ("s/2", theirs),
            ("a/3", ours),
            ("top", ours),
        ];
        let mut written = Vec::new();
        r.batch(&mut || {
            for (path, m) in &files {
                written.push(write(&r, path, path.as_bytes(), m).unwrap());
            }
        });
        for ((path, m), w) in files.iter().zip(&written) {
            assert_written(root, path, w, path.as_bytes(), m);
            let md = std::fs::symlink_metadata(root.join(path)).unwrap();
            if is_root {
                assert_eq!((md.uid(), md.gid()), (m.uid, m.gid), "{path}");
            }
        }
        assert_eq!(names(&root.join("a")), ["1", "2", "3"]);
        assert_eq!(names(&root.join("s")), ["1", "2"]);
        // The batch is over: nothing is kept, and another batch starts afresh.
        assert!(BATCH.with_borrow(|b| b.is_none()));
        r.batch(&mut || {
            write(&r, "a/4", b"x", &ours).unwrap();
        });
        assert_eq!(names(&root.join("a")), ["1", "2", "3", "4"]);
    }
}
