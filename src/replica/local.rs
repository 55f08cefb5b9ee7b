//! A replica in a local directory. Every operation resolves its parent directory relative to a
//! descriptor of the replica root with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`, and
//! acts on the last component with `*at` calls that do not follow symlinks. A symlink planted
//! anywhere in the replica therefore makes the operation fail; it never redirects it outside.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use rustix::fs::{self as rfs, AtFlags, Mode, OFlags, ResolveFlags, Timespec, Timestamps};

use super::{Check, Replica, Written};
use crate::entry::{Fingerprint, Hash, Kind, Meta, RelPath, Time};
use crate::hash;
use crate::plan::TMP_PREFIX;

/// A replica rooted at a directory that exists.
pub struct LocalReplica {
    root: OwnedFd,
    /// Whether owners are set (only root can).
    owners: bool,
    counter: AtomicU64,
    pid: u32,
}

/// A directory descriptor: the root's, borrowed, or one opened for a single operation.
enum Dir<'a> {
    Root(BorrowedFd<'a>),
    Owned(OwnedFd),
}

impl AsFd for Dir<'_> {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Dir::Root(fd) => *fd,
            Dir::Owned(fd) => fd.as_fd(),
        }
    }
}

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

pub fn fingerprint_of(st: &rfs::Stat) -> Fingerprint {
    let is_dir = rfs::FileType::from_raw_mode(st.st_mode) == rfs::FileType::Directory;
    Fingerprint {
        size: if is_dir { 0 } else { st.st_size as u64 },
        mtime: Time {
            sec: st.st_mtime,
            nsec: st.st_mtime_nsec as u32,
        },
        ctime: Time {
            sec: st.st_ctime,
            nsec: st.st_ctime_nsec as u32,
        },
        ino: st.st_ino,
        dev: st.st_dev,
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
        Ok(LocalReplica {
            root: fd,
            owners,
            counter: AtomicU64::new(0),
            pid: std::process::id(),
        })
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
                for d in dirs.iter().flatten() {
                    let fd = self.dir(d)?;
                    let st = rfs::fstat(&fd).map_err(io_err)?;
                    rfs::fchmod(&fd, Mode::from_raw_mode((st.st_mode & 0o7777) | 0o700))
                        .map_err(io_err)?;
                }
                op()
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

    fn hard_link_once(&self, leader: &RelPath, path: &RelPath) -> io::Result<Fingerprint> {
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
        Ok(fingerprint_of(&st))
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
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC | OFlags::NOFOLLOW;
        let resolve =
            ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
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
                OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::CLOEXEC | OFlags::NOFOLLOW;
            match rfs::openat(dir, os(&name), flags, Mode::from_raw_mode(0o600)) {
                Ok(fd) => return Ok((File::from(fd), name)),
                Err(rustix::io::Errno::EXIST) => continue,
                Err(e) => return Err(io_err(e)),
            }
        }
    }

    /// Sets owner, mode and mtime on an open file (owner first: chown clears setuid).
    fn finish_file(&self, f: &File, meta: &Meta) -> io::Result<()> {
        if self.owners {
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

    /// Writes a file under a temporary name in `dir`, sets its metadata, and renames it over
    /// `name`. Returns what `fill` wrote and the fingerprint of the file in place.
    fn write_into(
        &self,
        dir: &Dir,
        (mut f, tmp): (File, Vec<u8>),
        name: &[u8],
        meta: &Meta,
        fill: impl FnOnce(&mut File) -> io::Result<(Hash, u64)>,
    ) -> io::Result<Written> {
        let result = fill(&mut f).and_then(|r| {
            self.finish_file(&f, meta)?;
            Ok(r)
        });
        drop(f);
        let (hash, len) = self.commit(dir, &tmp, name, result)?;
        // After the rename: a rename changes the inode's ctime.
        let st = rfs::statat(dir, os(name), AtFlags::SYMLINK_NOFOLLOW).map_err(io_err)?;
        Ok(Written {
            hash,
            len,
            fp: fingerprint_of(&st),
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
    fn rename(&self, from: &RelPath, to: &RelPath) -> io::Result<()> {
        self.writable(&[from.parent(), to.parent()], || {
            let (fd, fname) = self.parent(from)?;
            let (td, tname) = self.parent(to)?;
            rfs::renameat(&fd, os(&fname), &td, os(&tname)).map_err(io_err)
        })
    }

    fn remove(&self, path: &RelPath, kind: Kind) -> io::Result<()> {
        self.writable(&[path.parent()], || self.remove_once(path, kind))
    }

    fn mkdir(&self, path: &RelPath) -> io::Result<()> {
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
        let tmp = self.writable(&[path.parent()], || self.create_tmp(&d))?;
        self.write_into(&d, tmp, &name, meta, |f| {
            let (h, n) = hash::copy_hashing(data, f)?;
            check(&h, n)?;
            Ok((h, n))
        })
    }
    fn copy_file(
        &self,
        from: &RelPath,
        to: &RelPath,
        trusted: Option<(&Fingerprint, &Hash)>,
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
        let fp = fingerprint_of(&st);
        let (td, tname) = self.parent(to)?;
        let tmp = self.writable(&[to.parent()], || self.create_tmp(&td))?;
        match trusted {
            Some((want, h)) if *want == fp => {
                let h = *h;
                self.write_into(&td, tmp, &tname, meta, |f| {
                    let n = kernel_copy(&src, f, fp.size)?;
                    check(&h, n)?;
                    Ok((h, n))
                })
            }
            _ => self.write_into(&td, tmp, &tname, meta, |f| {
                let (h, n) = hash::copy_hashing(&mut &src, f)?;
                check(&h, n)?;
                Ok((h, n))
            }),
        }
    }

    fn symlink(&self, path: &RelPath, target: &[u8], meta: &Meta) -> io::Result<()> {
        self.writable(&[path.parent()], || self.symlink_once(path, target, meta))
    }

    fn hard_link(&self, leader: &RelPath, path: &RelPath) -> io::Result<Fingerprint> {
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

    fn stat(&self, path: &RelPath) -> io::Result<Fingerprint> {
        if path.is_root() {
            return Ok(fingerprint_of(&rfs::fstat(&self.root).map_err(io_err)?));
        }
        let (d, name) = self.parent(path)?;
        let st = rfs::statat(&d, os(&name), AtFlags::SYMLINK_NOFOLLOW).map_err(io_err)?;
        Ok(fingerprint_of(&st))
    }
}

/// Copies `len` bytes in the kernel: a reflink where the filesystem shares extents, else
/// `copy_file_range`, else a plain read/write loop.
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
