//! The data model shared by every layer: relative paths in one canonical order, and the entry
//! (kind, content, metadata, stat fingerprint) recorded for each path of a tree.
//!
//! Invariants:
//! - A [`RelPath`] is a '/'-separated path relative to a root, with no empty, `.` or `..`
//!   component, no NUL byte and no leading or trailing '/'. The root itself is the empty path.
//! - Paths compare by their bytes. Every sorted list, every redb table and every merge-join in
//!   dirsync uses this one order, in which the descendants of a directory `d` are exactly the
//!   contiguous run of paths starting with `d/`.

use std::ffi::OsStr;
use std::fmt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// A BLAKE3 digest.
pub type Hash = [u8; 32];

/// A validated path relative to a tree root, ordered by its bytes.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
pub struct RelPath(Vec<u8>);

/// Why a byte string is not a valid [`RelPath`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid relative path {path:?}: {why}")]
pub struct InvalidPath {
    pub path: String,
    pub why: &'static str,
}

/// The parent of a path given as the bytes of a valid [`RelPath`] other than the root: empty
/// (the root) for a top-level name.
pub fn parent_of(b: &[u8]) -> &[u8] {
    b.iter()
        .rposition(|&c| c == b'/')
        .map_or(&b[..0], |i| &b[..i])
}

impl RelPath {
    /// The root of a tree.
    pub fn root() -> RelPath {
        RelPath(Vec::new())
    }

    /// Validates `bytes` as a relative path. This is the only way in for paths that come from
    /// outside the process (the index file), so a tampered index cannot name `..` or `/etc`.
    pub fn from_bytes(bytes: &[u8]) -> Result<RelPath, InvalidPath> {
        let fail = |why| InvalidPath {
            path: String::from_utf8_lossy(bytes).into_owned(),
            why,
        };
        if bytes.is_empty() {
            return Ok(RelPath::root());
        }
        if bytes.contains(&0) {
            return Err(fail("contains a NUL byte"));
        }
        if bytes[0] == b'/' {
            return Err(fail("is absolute"));
        }
        for part in bytes.split(|&b| b == b'/') {
            match part {
                b"" => return Err(fail("has an empty component")),
                b"." | b".." => return Err(fail("has a '.' or '..' component")),
                _ => {}
            }
        }
        Ok(RelPath(bytes.to_vec()))
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }

    /// `self` joined with one file name, which must not contain '/' or be `.`/`..`.
    pub fn join(&self, name: &[u8]) -> RelPath {
        debug_assert!(!name.is_empty() && !name.contains(&b'/') && name != b"." && name != b"..");
        let mut v = Vec::with_capacity(self.0.len() + 1 + name.len());
        v.extend_from_slice(&self.0);
        if !v.is_empty() {
            v.push(b'/');
        }
        v.extend_from_slice(name);
        RelPath(v)
    }

    /// The parent directory; `None` for the root.
    pub fn parent(&self) -> Option<RelPath> {
        self.parent_bytes().map(|b| RelPath(b.to_vec()))
    }

    /// The parent's bytes, without allocating; `None` for the root.
    pub fn parent_bytes(&self) -> Option<&[u8]> {
        (!self.is_root()).then(|| parent_of(&self.0))
    }

    /// The last component; empty for the root.
    pub fn name(&self) -> &[u8] {
        match self.0.iter().rposition(|&b| b == b'/') {
            Some(i) => &self.0[i + 1..],
            None => &self.0,
        }
    }

    /// Number of components (0 for the root).
    pub fn depth(&self) -> usize {
        if self.is_root() {
            0
        } else {
            1 + self.0.iter().filter(|&&b| b == b'/').count()
        }
    }

    /// True if `other` lies strictly below `self`.
    pub fn is_ancestor_of(&self, other: &RelPath) -> bool {
        if self.is_root() {
            return !other.is_root();
        }
        other.0.len() > self.0.len()
            && other.0.starts_with(&self.0)
            && other.0[self.0.len()] == b'/'
    }

    /// `self` with its prefix `from` replaced by `to`; `from` must be `self` or an ancestor.
    pub fn rebase(&self, from: &RelPath, to: &RelPath) -> RelPath {
        debug_assert!(from == self || from.is_ancestor_of(self));
        if from == self {
            return to.clone();
        }
        let rest = if from.is_root() {
            &self.0[..]
        } else {
            &self.0[from.0.len() + 1..]
        };
        let mut v = to.0.clone();
        if !v.is_empty() {
            v.push(b'/');
        }
        v.extend_from_slice(rest);
        RelPath(v)
    }

    /// The index range of `sorted` that holds exactly the descendants of `self`.
    pub fn descendants_in<T>(
        &self,
        sorted: &[T],
        key: impl Fn(&T) -> &RelPath,
    ) -> std::ops::Range<usize> {
        let start = if self.is_root() {
            sorted.partition_point(|x| key(x).is_root())
        } else {
            let mut lo = self.0.clone();
            lo.push(b'/');
            sorted.partition_point(|x| key(x).0 < lo)
        };
        let len = sorted[start..].partition_point(|x| self.is_ancestor_of(key(x)));
        start..start + len
    }

    /// The path below `root` on disk.
    pub fn to_path(&self, root: &Path) -> PathBuf {
        if self.is_root() {
            root.to_path_buf()
        } else {
            root.join(OsStr::from_bytes(&self.0))
        }
    }

    /// The last component as an `OsStr`.
    pub fn name_os(&self) -> &OsStr {
        OsStr::from_bytes(self.name())
    }

    pub fn as_os_str(&self) -> &OsStr {
        OsStr::from_bytes(&self.0)
    }
}

/// Displays the path as UTF-8 with every byte that is not escaped as `\xNN`; the root shows as `.`.
impl fmt::Display for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_root() {
            return f.write_str(".");
        }
        Shown(&self.0).fmt(f)
    }
}

/// Path bytes for a message: valid UTF-8 as it is, except that `\` shows as `\\` and control
/// characters and invalid bytes as `\xNN`, so that no file name can start a new line or send
/// a terminal escape.
pub struct Shown<'a>(pub &'a [u8]);

/// `path` for a message (see [`Shown`]).
pub fn shown(path: &Path) -> Shown<'_> {
    Shown(path.as_os_str().as_bytes())
}

/// Characters a name may not show as they are: controls (C0 and C1), and the invisible and
/// direction-changing ones that could make a name look like another (zero-width spaces and
/// joiners, bidi marks, embeddings, overrides and isolates, line and paragraph separators, BOM).
fn is_hidden(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{200b}'..='\u{200f}' | '\u{2028}'..='\u{202e}' | '\u{2060}'..='\u{2069}' | '\u{feff}')
}

impl fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for chunk in self.0.utf8_chunks() {
            for c in chunk.valid().chars() {
                if c == '\\' {
                    f.write_str("\\\\")?;
                } else if is_hidden(c) {
                    // Byte by byte, as invalid bytes are: every `\xNN` is one byte, so two
                    // names never show alike.
                    let mut buf = [0; 4];
                    for b in c.encode_utf8(&mut buf).bytes() {
                        write!(f, "\\x{b:02x}")?;
                    }
                } else {
                    write!(f, "{c}")?;
                }
            }
            for b in chunk.invalid() {
                write!(f, "\\x{b:02x}")?;
            }
        }
        Ok(())
    }
}

impl fmt::Debug for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{self}\"")
    }
}

/// A point in time as seconds and nanoseconds since the epoch.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default)]
pub struct Time {
    pub sec: i64,
    pub nsec: u32,
}

impl Time {
    pub fn as_nanos(self) -> i128 {
        self.sec as i128 * 1_000_000_000 + self.nsec as i128
    }

    pub fn now() -> Time {
        let d = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Time {
            sec: d.as_secs() as i64,
            nsec: d.subsec_nanos(),
        }
    }
}

/// The stat fields that change whenever a file's content can have changed.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct Fingerprint {
    pub size: u64,
    pub mtime: Time,
    pub ctime: Time,
    pub ino: u64,
    pub dev: u64,
}

/// What is replicated of a node besides its content.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct Meta {
    /// Permission bits including setuid, setgid and sticky (`st_mode & 0o7777`).
    pub mode: u32,
    pub mtime: Time,
    pub uid: u32,
    pub gid: u32,
}

// The only conversions of a stat result into a fingerprint or metadata: from `fstatat`
// (`rustix`) where the walkers and the local replica stat, from `std` where a file was opened
// through `std::fs`. A directory's fingerprint has size 0: its `st_size` says nothing stable.

/// A stat timestamp (seconds, nanoseconds) as a [`Time`].
fn stamp(sec: i64, nsec: u32) -> Time {
    Time { sec, nsec }
}

impl Fingerprint {
    pub fn of(st: &rustix::fs::Stat) -> Fingerprint {
        let is_dir = rustix::fs::FileType::from_raw_mode(st.st_mode).is_dir();
        Fingerprint {
            size: if is_dir { 0 } else { st.st_size as u64 },
            mtime: stamp(st.st_mtime, st.st_mtime_nsec as u32),
            ctime: stamp(st.st_ctime, st.st_ctime_nsec as u32),
            ino: st.st_ino,
            dev: st.st_dev,
        }
    }

    pub fn of_metadata(md: &std::fs::Metadata) -> Fingerprint {
        Fingerprint {
            size: if md.is_dir() { 0 } else { md.size() },
            mtime: stamp(md.mtime(), md.mtime_nsec() as u32),
            ctime: stamp(md.ctime(), md.ctime_nsec() as u32),
            ino: md.ino(),
            dev: md.dev(),
        }
    }
}

impl Meta {
    pub fn of(st: &rustix::fs::Stat) -> Meta {
        Meta {
            mode: st.st_mode & 0o7777,
            mtime: stamp(st.st_mtime, st.st_mtime_nsec as u32),
            uid: st.st_uid,
            gid: st.st_gid,
        }
    }

    pub fn of_metadata(md: &std::fs::Metadata) -> Meta {
        Meta {
            mode: md.mode() & 0o7777,
            mtime: stamp(md.mtime(), md.mtime_nsec() as u32),
            uid: md.uid(),
            gid: md.gid(),
        }
    }
}

/// The content of a node. `None` hashes are not known yet: a file whose size matches no file on
/// the other side cannot be a move, copy or adoption source, so it is hashed while it is copied.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum Content {
    File {
        size: u64,
        #[serde(with = "hash_bytes")]
        hash: Option<Hash>,
    },
    Dir {
        #[serde(with = "hash_bytes")]
        tree: Option<Hash>,
    },
    Symlink {
        target: Vec<u8>,
    },
    /// A FIFO, socket or device found in the replica; never replicated, always removed.
    Special,
}

/// Hashes encode as one byte string, not as 32 separate numbers: that is what makes reading
/// the index cheap.
mod hash_bytes {
    use super::Hash;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(h: &Option<Hash>, s: S) -> Result<S::Ok, S::Error> {
        match h {
            Some(h) => s.serialize_some(&Bytes(h)),
            None => s.serialize_none(),
        }
    }

    /// Serializes as a byte string.
    struct Bytes<'a>(&'a [u8]);

    impl serde::Serialize for Bytes<'_> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_bytes(self.0)
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Hash>, D::Error> {
        match Option::<&'de [u8]>::deserialize(d)? {
            None => Ok(None),
            Some(b) => Hash::try_from(b)
                .map(Some)
                .map_err(|_| serde::de::Error::invalid_length(b.len(), &"32 bytes")),
        }
    }
}

/// Time, fingerprint and metadata encode as fixed-width little-endian byte strings: one read
/// per group instead of a dozen variable-length integers.
mod fixed {
    use super::{Fingerprint, Meta, Time};
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    struct Out<const N: usize>([u8; N], usize);

    impl<const N: usize> Out<N> {
        fn new() -> Self {
            Out([0; N], 0)
        }
        fn put(&mut self, b: &[u8]) -> &mut Self {
            self.0[self.1..self.1 + b.len()].copy_from_slice(b);
            self.1 += b.len();
            self
        }
        fn time(&mut self, t: Time) -> &mut Self {
            self.put(&t.sec.to_le_bytes()).put(&t.nsec.to_le_bytes())
        }
    }

    struct In<'a>(&'a [u8]);

    impl In<'_> {
        fn take<const K: usize>(&mut self) -> [u8; K] {
            let (head, rest) = self.0.split_at(K);
            self.0 = rest;
            head.try_into().expect("split at K")
        }
        fn u32(&mut self) -> u32 {
            u32::from_le_bytes(self.take())
        }
        fn u64(&mut self) -> u64 {
            u64::from_le_bytes(self.take())
        }
        fn time(&mut self) -> Time {
            let sec = i64::from_le_bytes(self.take());
            Time {
                sec,
                nsec: self.u32(),
            }
        }
    }

    fn read<'de, D: Deserializer<'de>>(d: D, n: usize) -> Result<In<'de>, D::Error> {
        let b = <&'de [u8]>::deserialize(d)?;
        match b.len() == n {
            true => Ok(In(b)),
            false => Err(serde::de::Error::invalid_length(
                b.len(),
                &"a fixed-width record",
            )),
        }
    }

    impl Serialize for Time {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_bytes(&Out::<12>::new().time(*self).0)
        }
    }

    impl<'de> Deserialize<'de> for Time {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            Ok(read(d, 12)?.time())
        }
    }

    impl Serialize for Fingerprint {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            let mut o = Out::<48>::new();
            o.put(&self.size.to_le_bytes())
                .time(self.mtime)
                .time(self.ctime);
            o.put(&self.ino.to_le_bytes()).put(&self.dev.to_le_bytes());
            s.serialize_bytes(&o.0)
        }
    }

    impl<'de> Deserialize<'de> for Fingerprint {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            let mut i = read(d, 48)?;
            Ok(Fingerprint {
                size: i.u64(),
                mtime: i.time(),
                ctime: i.time(),
                ino: i.u64(),
                dev: i.u64(),
            })
        }
    }

    impl Serialize for Meta {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            let mut o = Out::<24>::new();
            o.put(&self.mode.to_le_bytes()).time(self.mtime);
            o.put(&self.uid.to_le_bytes()).put(&self.gid.to_le_bytes());
            s.serialize_bytes(&o.0)
        }
    }

    impl<'de> Deserialize<'de> for Meta {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            let mut i = read(d, 24)?;
            Ok(Meta {
                mode: i.u32(),
                mtime: i.time(),
                uid: i.u32(),
                gid: i.u32(),
            })
        }
    }

    #[cfg(test)]
    mod tests {
        use crate::entry::*;

        #[test]
        fn entries_round_trip_through_postcard() {
            let t = |sec, nsec| Time { sec, nsec };
            let e = Entry {
                content: Content::File {
                    size: u64::MAX,
                    hash: Some([7; 32]),
                },
                meta: Meta {
                    mode: 0o4755,
                    mtime: t(-5, 999_999_999),
                    uid: u32::MAX,
                    gid: 3,
                },
                fp: Fingerprint {
                    size: 1 << 40,
                    mtime: t(i64::MIN, 1),
                    ctime: t(i64::MAX, 2),
                    ino: 9,
                    dev: u64::MAX,
                },
                seen: t(1_800_000_000, 5),
                link: Some(RelPath::from_bytes(b"a/b").unwrap()),
            };
            let bytes = postcard::to_stdvec(&e).unwrap();
            assert_eq!(postcard::from_bytes::<Entry>(&bytes).unwrap(), e);
            let cut = &bytes[..bytes.len() - 5];
            assert!(postcard::from_bytes::<Entry>(cut).is_err());
        }
    }
}

/// The kind of a node, for messages and type-change detection.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    Special,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::File => "file",
            Kind::Dir => "directory",
            Kind::Symlink => "symlink",
            Kind::Special => "special file",
        })
    }
}

/// Everything recorded about one path of a tree.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Entry {
    pub content: Content,
    pub meta: Meta,
    /// The stat fingerprint of the node the content was read from.
    pub fp: Fingerprint,
    /// When `fp` was taken, before the content was read; decides whether the entry is racily
    /// clean (see [`Entry::is_racy`]).
    pub seen: Time,
    /// For a file with other hard links in the same tree: the first of its paths in canonical
    /// order, when that is not this path.
    pub link: Option<RelPath>,
}

/// How close to the moment it was read a node may have changed and still keep its fingerprint on
/// the next change, on filesystems with nanosecond timestamps that follow the kernel's coarse
/// clock (ext4, tmpfs, xfs, btrfs): one clock tick is at most 10 ms.
pub const RACY_WINDOW_FINE_NS: i128 = 20_000_000;
/// The same on any other filesystem (some keep seconds, FAT keeps two), or across devices.
pub const RACY_WINDOW_NS: i128 = 2_000_000_000;

impl Entry {
    pub fn kind(&self) -> Kind {
        match self.content {
            Content::File { .. } => Kind::File,
            Content::Dir { .. } => Kind::Dir,
            Content::Symlink { .. } => Kind::Symlink,
            Content::Special => Kind::Special,
        }
    }

    pub fn is_dir(&self) -> bool {
        matches!(self.content, Content::Dir { .. })
    }

    pub fn file_hash(&self) -> Option<Hash> {
        match self.content {
            Content::File { hash, .. } => hash,
            _ => None,
        }
    }

    pub fn size(&self) -> u64 {
        match self.content {
            Content::File { size, .. } => size,
            _ => 0,
        }
    }

    /// True when the node changed less than `window_ns` before `seen`, so that a later change
    /// within the same timestamp tick would leave `fp` as it is (git's racy-git problem); such a
    /// hash must not be reused.
    pub fn is_racy(&self, window_ns: i128) -> bool {
        let changed = self.fp.mtime.as_nanos().max(self.fp.ctime.as_nanos());
        changed + window_ns > self.seen.as_nanos()
    }

    /// Same content, as far as it is known: unknown hashes never compare equal.
    pub fn same_content(&self, other: &Entry) -> bool {
        match (&self.content, &other.content) {
            (
                Content::File {
                    size: a,
                    hash: Some(x),
                },
                Content::File {
                    size: b,
                    hash: Some(y),
                },
            ) => a == b && x == y,
            (Content::Dir { tree: Some(x) }, Content::Dir { tree: Some(y) }) => x == y,
            (Content::Symlink { target: x }, Content::Symlink { target: y }) => x == y,
            _ => false,
        }
    }

    /// Same replicated metadata. Symlink permission bits are not settable on Linux and are
    /// ignored; owners count only when they are replicated.
    pub fn same_meta(&self, other: &Entry, owners: bool) -> bool {
        let a = &self.meta;
        let b = &other.meta;
        let mode = self.kind() == Kind::Symlink || a.mode == b.mode;
        mode && a.mtime == b.mtime && (!owners || (a.uid == b.uid && a.gid == b.gid))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shown_names_are_unambiguous_and_hide_nothing() {
        let show = |b: &[u8]| Shown(b).to_string();
        assert_eq!(show(b"x\xc2\x9b"), "x\\xc2\\x9b", "U+009B, a C1 control");
        assert_eq!(show(b"x\x9b"), "x\\x9b", "an invalid byte");
        assert_eq!(show(b"a\nb\x1b"), "a\\x0ab\\x1b");
        assert_eq!(show("rlo\u{202e}txt".as_bytes()), "rlo\\xe2\\x80\\xaetxt");
        assert_eq!(
            show("zw\u{200b}\u{feff}".as_bytes()),
            "zw\\xe2\\x80\\x8b\\xef\\xbb\\xbf"
        );
        assert_eq!(show("caf\u{e9} \\".as_bytes()), "caf\u{e9} \\\\");
    }

    fn p(s: &str) -> RelPath {
        RelPath::from_bytes(s.as_bytes()).unwrap()
    }

    #[test]
    fn validation_rejects_escapes() {
        for bad in ["/etc", "a/../b", "..", "a//b", "a/", "./a", "a\0b"] {
            assert!(RelPath::from_bytes(bad.as_bytes()).is_err(), "{bad}");
        }
        assert!(RelPath::from_bytes(b"a/b.c/d").is_ok());
        assert!(RelPath::from_bytes(b"").unwrap().is_root());
    }

    #[test]
    fn byte_order_keeps_descendants_contiguous() {
        let mut v = vec![p("a/x"), p("a.b"), p("a"), p("a/x/y"), p("a0"), p("b")];
        v.sort();
        let names: Vec<String> = v.iter().map(|p| p.to_string()).collect();
        assert_eq!(names, ["a", "a.b", "a/x", "a/x/y", "a0", "b"]);
        let r = p("a").descendants_in(&v, |x| x);
        assert_eq!(&v[r], [p("a/x"), p("a/x/y")]);
        let r = RelPath::root().descendants_in(&v, |x| x);
        assert_eq!(r, 0..6);
    }

    #[test]
    fn ancestry_and_rebase() {
        assert!(p("a").is_ancestor_of(&p("a/b")));
        assert!(!p("a").is_ancestor_of(&p("ab")));
        assert!(!p("a").is_ancestor_of(&p("a")));
        assert!(RelPath::root().is_ancestor_of(&p("a")));
        assert_eq!(p("a/b/c").rebase(&p("a/b"), &p("x")), p("x/c"));
        assert_eq!(p("a/b").rebase(&p("a/b"), &p("x/y")), p("x/y"));
        assert_eq!(p("a/b").parent(), Some(p("a")));
        assert_eq!(p("a").parent(), Some(RelPath::root()));
        assert_eq!(p("a/b").name(), b"b");
        assert_eq!(p("a/b").depth(), 2);
    }

    #[test]
    fn racy_entries_are_those_changed_within_the_window_before_they_were_read() {
        let at = |sec: i64, nsec: u32| Time { sec, nsec };
        let mut e = Entry {
            content: Content::File {
                size: 1,
                hash: Some([0; 32]),
            },
            meta: Meta::default(),
            fp: Fingerprint {
                mtime: at(100, 0),
                ctime: at(100, 0),
                ..Fingerprint::default()
            },
            seen: at(100, 5_000_000),
            link: None,
        };
        assert!(e.is_racy(RACY_WINDOW_FINE_NS), "read 5 ms after a change");
        e.seen = at(100, 30_000_000);
        assert!(!e.is_racy(RACY_WINDOW_FINE_NS), "read 30 ms after");
        assert!(e.is_racy(RACY_WINDOW_NS), "but within two seconds");
        e.fp.ctime = at(100, 29_000_000);
        assert!(e.is_racy(RACY_WINDOW_FINE_NS), "a ctime change counts too");
    }

    #[test]
    fn display_escapes_non_utf8() {
        let r = RelPath::from_bytes(b"caf\xe9/\xc3\xa9\n").unwrap();
        assert_eq!(r.to_string(), "caf\\xe9/\u{e9}\\x0a");
    }
}
