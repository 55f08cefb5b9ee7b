//! The replica's root directory, held for a whole command: resolved once, created (when missing)
//! without following a symlink, and opened as a descriptor that every pass works beneath, so a
//! replica path that is later renamed or replaced by a symlink is never followed. The held
//! descriptor also carries the replica's lock: one dirsync process at a time writes to a
//! replica, whatever index it uses.

use std::ffi::OsString;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::fs::{self as rfs, FlockOperation, Mode, OFlags, ResolveFlags};

/// An open replica root directory.
#[derive(Debug)]
pub struct ReplicaRoot {
    path: PathBuf,
    fd: OwnedFd,
    /// Device and inode of the held directory.
    id: (u64, u64),
}

fn io_err(e: rustix::io::Errno) -> io::Error {
    io::Error::from_raw_os_error(e.raw_os_error())
}

const DIR_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);

/// Opens the directory `path` (absolute and canonical) with no symlink anywhere on the way.
fn open_no_symlinks(path: &Path) -> rustix::io::Result<OwnedFd> {
    let resolve = ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
    match rfs::openat2(rfs::CWD, path, DIR_FLAGS, Mode::empty(), resolve) {
        Err(rustix::io::Errno::NOSYS) => rfs::open(path, DIR_FLAGS, Mode::empty()),
        other => other,
    }
}

impl ReplicaRoot {
    fn held(path: &Path, fd: OwnedFd) -> io::Result<ReplicaRoot> {
        let st = rfs::fstat(&fd).map_err(io_err)?;
        Ok(ReplicaRoot {
            path: path.to_path_buf(),
            fd,
            id: (st.st_dev, st.st_ino),
        })
    }

    /// Opens the replica root `path` (canonical), or `None` if it does not exist. A symlink
    /// anywhere in `path` is refused (`ELOOP`): the path was resolved when it was validated.
    pub fn open(path: &Path) -> io::Result<Option<ReplicaRoot>> {
        match open_no_symlinks(path) {
            Ok(fd) => Self::held(path, fd).map(Some),
            Err(rustix::io::Errno::NOENT) => Ok(None),
            Err(e) => Err(io_err(e)),
        }
    }

    /// Opens the replica root `path` (canonical), creating it and its missing parents first.
    /// Each missing directory is made beneath the descriptor of the one above it, so nothing is
    /// ever created through a symlink.
    pub fn create(path: &Path) -> io::Result<ReplicaRoot> {
        let mut missing: Vec<OsString> = Vec::new();
        let mut base = path;
        let mut fd = loop {
            match open_no_symlinks(base) {
                Ok(fd) => break fd,
                Err(rustix::io::Errno::NOENT) => {
                    let (Some(name), Some(parent)) = (base.file_name(), base.parent()) else {
                        return Err(io::Error::from(io::ErrorKind::NotFound));
                    };
                    missing.push(name.to_os_string());
                    base = parent;
                }
                Err(e) => return Err(io_err(e)),
            }
        };
        for name in missing.iter().rev() {
            match rfs::mkdirat(&fd, name, Mode::from_raw_mode(0o777)) {
                Ok(()) | Err(rustix::io::Errno::EXIST) => {}
                Err(e) => return Err(io_err(e)),
            }
            fd = rfs::openat(&fd, name, DIR_FLAGS, Mode::empty()).map_err(io_err)?;
        }
        Self::held(path, fd)
    }

    /// Takes the replica's exclusive lock for as long as this root is held (and any descriptor
    /// cloned from it is open). Returns false at once if another process holds it.
    pub fn try_lock(&self) -> io::Result<bool> {
        match rfs::flock(&self.fd, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => Ok(true),
            Err(rustix::io::Errno::WOULDBLOCK) => Ok(false),
            Err(e) => Err(io_err(e)),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// A second descriptor of the same open directory (sharing its lock).
    pub fn try_clone(&self) -> io::Result<OwnedFd> {
        self.fd.try_clone()
    }

    /// Whether the replica path still names the held directory itself: not a symlink (even to
    /// it), not another directory put in its place, not missing.
    pub fn is_named_by_path(&self) -> bool {
        match rfs::lstat(&self.path) {
            Ok(st) => {
                rfs::FileType::from_raw_mode(st.st_mode) == rfs::FileType::Directory
                    && (st.st_dev, st.st_ino) == self.id
            }
            Err(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_makes_missing_parents_and_refuses_a_symlink_on_the_way() {
        let tmp = tempfile::tempdir().unwrap();
        let base = std::fs::canonicalize(tmp.path()).unwrap();
        let root = ReplicaRoot::create(&base.join("a/b/c")).unwrap();
        assert!(base.join("a/b/c").is_dir());
        assert!(root.is_named_by_path());
        assert!(ReplicaRoot::open(&base.join("none")).unwrap().is_none());

        std::fs::create_dir(base.join("elsewhere")).unwrap();
        std::os::unix::fs::symlink(base.join("elsewhere"), base.join("link")).unwrap();
        let e = ReplicaRoot::create(&base.join("link/new")).unwrap_err();
        assert_eq!(
            e.raw_os_error(),
            Some(rustix::io::Errno::LOOP.raw_os_error())
        );
        assert!(ReplicaRoot::open(&base.join("link")).is_err());
        assert_eq!(
            std::fs::read_dir(base.join("elsewhere")).unwrap().count(),
            0
        );
    }

    #[test]
    fn a_path_that_stops_naming_the_root_is_noticed() {
        let tmp = tempfile::tempdir().unwrap();
        let base = std::fs::canonicalize(tmp.path()).unwrap();
        let dst = base.join("dst");
        let root = ReplicaRoot::create(&dst).unwrap();
        std::fs::rename(&dst, base.join("dst.old")).unwrap();
        assert!(!root.is_named_by_path(), "missing");
        std::os::unix::fs::symlink(base.join("dst.old"), &dst).unwrap();
        assert!(!root.is_named_by_path(), "a symlink to the same directory");
        std::fs::remove_file(&dst).unwrap();
        std::fs::create_dir(&dst).unwrap();
        assert!(!root.is_named_by_path(), "another directory");
        std::fs::remove_dir(&dst).unwrap();
        std::fs::rename(base.join("dst.old"), &dst).unwrap();
        assert!(root.is_named_by_path(), "back");
    }

    #[test]
    fn one_lock_per_replica() {
        let tmp = tempfile::tempdir().unwrap();
        let dst = std::fs::canonicalize(tmp.path()).unwrap();
        let a = ReplicaRoot::open(&dst).unwrap().unwrap();
        let b = ReplicaRoot::open(&dst).unwrap().unwrap();
        assert!(a.try_lock().unwrap());
        assert!(!b.try_lock().unwrap());
        drop(a);
        assert!(b.try_lock().unwrap());
    }
}
