//! Whether one directory is inside another, whatever paths name them.
//!
//! Paths cannot tell: a bind mount shows one directory at two paths, a symlink adds more. A
//! directory is described instead by its [`Place`], and "inside" holds when either of two
//! independent descriptions says so:
//! - identity ancestry: the (device, inode) of the directory and of every directory met going
//!   up from it with `..`, to `/`. A directory has the same (device, inode) at every path that
//!   shows it.
//! - filesystem path: where the directory lies inside its own filesystem, from
//!   `/proc/self/mountinfo` (the mount's root joined with the path below its mount point). `..`
//!   from the top of a bind-mounted subdirectory leads to the mount point's parent, not to the
//!   directory's parent in its filesystem, so ancestry alone misses a tree reached through a
//!   mount of one of its subdirectories; the filesystem path does not.
//!
//! Only reads and `O_PATH` opens happen here.

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, Mode, OFlags, StatxFlags};

/// A directory's identity, the same at every path that shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DirId {
    pub dev: u64,
    pub ino: u64,
}

/// Where an existing directory is; see the module documentation.
#[derive(Clone, Debug)]
pub struct Place {
    /// The directory itself first, then each parent reached with `..`, ending with `/`.
    chain: Vec<DirId>,
    /// The filesystem (as `/proc/self/mountinfo` names it, `major:minor`) and the path inside
    /// it; `None` when the mount table cannot tell.
    fs_path: Option<(OsString, PathBuf)>,
}

/// More parents than any real tree has: a loop in `..` (a broken filesystem) ends the walk.
const MAX_DEPTH: usize = 4096;

impl Place {
    /// The place of the existing directory at `dir`, which should be canonical (it is used to
    /// find the path below the mount point).
    pub fn of(dir: &Path) -> io::Result<Place> {
        let flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC;
        let fd = rustix::fs::open(dir, flags, Mode::empty())?;
        let fs_path = fs_path(&fd, dir);
        let mut chain = vec![id(&fd)?];
        let mut cur = fd;
        while chain.len() < MAX_DEPTH {
            let parent = rustix::fs::openat(&cur, "..", flags, Mode::empty())?;
            let pid = id(&parent)?;
            if Some(&pid) == chain.last() {
                break;
            }
            chain.push(pid);
            cur = parent;
        }
        Ok(Place { chain, fs_path })
    }

    pub fn id(&self) -> DirId {
        self.chain[0]
    }

    /// Whether both are the same directory.
    pub fn is_same(&self, other: &Place) -> bool {
        self.id() == other.id()
    }

    /// Whether this directory is `other` or lies anywhere below it.
    pub fn is_within(&self, other: &Place) -> bool {
        if self.chain.contains(&other.id()) {
            return true;
        }
        match (&self.fs_path, &other.fs_path) {
            (Some((fs, path)), Some((other_fs, other_path))) => {
                fs == other_fs && path.starts_with(other_path)
            }
            _ => false,
        }
    }
}

fn id(fd: &OwnedFd) -> io::Result<DirId> {
    let st = rustix::fs::fstat(fd)?;
    Ok(DirId {
        dev: st.st_dev,
        ino: st.st_ino,
    })
}

/// One line of `/proc/self/mountinfo`, the fields used here.
struct Mount {
    id: u64,
    fs: OsString,
    root: PathBuf,
    mount_point: PathBuf,
}

/// The filesystem holding `fd` (opened from the canonical path `dir`) and the path of the
/// directory inside it.
fn fs_path(fd: &OwnedFd, dir: &Path) -> Option<(OsString, PathBuf)> {
    let text = std::fs::read("/proc/self/mountinfo").ok()?;
    let mounts: Vec<Mount> = text.split(|&b| b == b'\n').filter_map(parse_line).collect();
    let st = rustix::fs::statx(fd, "", AtFlags::EMPTY_PATH, StatxFlags::MNT_ID).ok();
    let by_id = st
        .filter(|st| StatxFlags::from_bits_retain(st.stx_mask).contains(StatxFlags::MNT_ID))
        .and_then(|st| mounts.iter().find(|m| m.id == st.stx_mnt_id));
    // Without mount ids (Linux before 5.8): the mount with the longest mount point above `dir`,
    // the last one listed where several are stacked.
    let mount = by_id.or_else(|| {
        mounts
            .iter()
            .filter(|m| dir.starts_with(&m.mount_point))
            .max_by_key(|m| m.mount_point.as_os_str().len())
    })?;
    let below = dir.strip_prefix(&mount.mount_point).ok()?;
    Some((mount.fs.clone(), mount.root.join(below)))
}

/// Parses `ID PARENT MAJOR:MINOR ROOT MOUNT_POINT ...`.
fn parse_line(line: &[u8]) -> Option<Mount> {
    let mut fields = line.split(|&b| b == b' ');
    let id = std::str::from_utf8(fields.next()?).ok()?.parse().ok()?;
    let _parent = fields.next()?;
    let fs = OsStr::from_bytes(fields.next()?).to_os_string();
    let root = PathBuf::from(unescape(fields.next()?));
    let mount_point = PathBuf::from(unescape(fields.next()?));
    Some(Mount {
        id,
        fs,
        root,
        mount_point,
    })
}

/// Undoes the kernel's octal escapes (`\040` for a space, and so on) in a mountinfo path.
fn unescape(field: &[u8]) -> OsString {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        let octal = field
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match (field[i], octal) {
            (b'\\', Some(d)) => {
                out.push((d[0] - b'0') << 6 | (d[1] - b'0') << 3 | (d[2] - b'0'));
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    OsString::from_vec(out)
}

/// Splits a canonical path that may not exist into its deepest existing ancestor and the
/// names below it that do not exist yet.
pub fn existing_prefix(path: &Path) -> (&Path, Vec<&OsStr>) {
    let mut missing = Vec::new();
    let mut cur = path;
    while std::fs::symlink_metadata(cur).is_err() {
        match (cur.parent(), cur.file_name()) {
            (Some(parent), Some(name)) => {
                missing.push(name);
                cur = parent;
            }
            _ => break,
        }
    }
    missing.reverse();
    (cur, missing)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unescapes_mountinfo_paths() {
        assert_eq!(unescape(br"/a\040b\134c\011"), OsString::from("/a b\\c\t"));
        assert_eq!(unescape(br"/x\04"), OsString::from(r"/x\04"));
    }

    #[test]
    fn parses_a_mountinfo_line() {
        let line = b"45 27 254:0 /tmp/p\\040q /tmp/bp rw,relatime - ext4 /dev/vda rw";
        let m = parse_line(line).unwrap();
        assert_eq!(m.id, 45);
        assert_eq!(m.fs, OsString::from("254:0"));
        assert_eq!(m.root, PathBuf::from("/tmp/p q"));
        assert_eq!(m.mount_point, PathBuf::from("/tmp/bp"));
        assert!(parse_line(b"").is_none());
    }

    #[test]
    fn nested_directories_are_within_and_siblings_are_not() {
        let tmp = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(tmp.path()).unwrap();
        std::fs::create_dir_all(root.join("a/b/c")).unwrap();
        std::fs::create_dir_all(root.join("d")).unwrap();
        let a = Place::of(&root.join("a")).unwrap();
        let c = Place::of(&root.join("a/b/c")).unwrap();
        let d = Place::of(&root.join("d")).unwrap();
        assert!(c.is_within(&a) && a.is_within(&a) && a.is_same(&a));
        assert!(!a.is_within(&c) && !d.is_within(&a) && !a.is_within(&d));
        assert!(c.is_within(&Place::of(Path::new("/")).unwrap()));
    }

    #[test]
    fn existing_prefix_splits_at_the_first_missing_name() {
        let tmp = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(tmp.path()).unwrap();
        let path = root.join("x/y");
        let (base, rest) = existing_prefix(&path);
        assert_eq!(base, root.as_path());
        assert_eq!(rest, [OsStr::new("x"), OsStr::new("y")]);
        assert_eq!(existing_prefix(&root), (root.as_path(), vec![]));
    }
}
