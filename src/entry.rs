//! The data model shared by every layer: relative paths in one canonical order, and the entry
//! (kind, content, metadata, the backend's stamp) recorded for each path of a tree.
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

/// What proves a node unchanged since it was looked at, as its backend can tell. Equal stamps
/// mean "the same bytes as when the hash was taken" unless the node changed within the racy
/// window of that look ([`Entry::is_racy`]). Each backend keeps one variant for all its nodes.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Stamp {
    /// A POSIX filesystem: size, mtime and ctime in nanoseconds, inode and device.
    Posix {
        size: u64,
        mtime: Time,
        ctime: Time,
        ino: u64,
        dev: u64,
    },
    /// A remote that keeps whole-second mtimes and no inodes (SFTP v3).
    Seconds { size: u64, mtime: i64 },
    /// An object store: size and the BLAKE3 of the object's ETag or version id (which changes
    /// with every write of the object).
    Object { size: u64, etag: Hash },
}

/// A POSIX stamp of zeros: a node not stat'ed (tests, plans built without a tree).
impl Default for Stamp {
    fn default() -> Stamp {
        Stamp::Posix {
            size: 0,
            mtime: Time::default(),
            ctime: Time::default(),
            ino: 0,
            dev: 0,
        }
    }
}

impl Stamp {
    /// The size of the node's content as the backend reported it (0 for a directory).
    pub fn size(&self) -> u64 {
        match *self {
            Stamp::Posix { size, .. }
            | Stamp::Seconds { size, .. }
            | Stamp::Object { size, .. } => size,
        }
    }

    /// The node behind the name, `(device, inode)`, where the backend has inodes: what rename
    /// reuse, hard-link detection and the check that a source file opened is the one scanned
    /// key on. `None` for a backend without inodes.
    pub fn node(&self) -> Option<(u64, u64)> {
        match *self {
            Stamp::Posix { ino, dev, .. } => Some((dev, ino)),
            Stamp::Seconds { .. } | Stamp::Object { .. } => None,
        }
    }

    /// The last time the node changed as the stamp sees it, in nanoseconds since the epoch: the
    /// later of mtime and ctime (POSIX), the mtime (seconds). `None` for an object stamp, which
    /// changes with every write and so is never racily clean.
    pub fn changed_ns(&self) -> Option<i128> {
        match *self {
            Stamp::Posix { mtime, ctime, .. } => Some(mtime.as_nanos().max(ctime.as_nanos())),
            Stamp::Seconds { mtime, .. } => Some(mtime as i128 * 1_000_000_000),
            Stamp::Object { .. } => None,
        }
    }

    /// Whether the stamp's times have nanoseconds (a POSIX stamp whose times are not both whole
    /// seconds): only then may the racy window be narrower than a timestamp of seconds needs.
    pub fn has_fine_times(&self) -> bool {
        match *self {
            Stamp::Posix { mtime, ctime, .. } => mtime.nsec != 0 || ctime.nsec != 0,
            Stamp::Seconds { .. } | Stamp::Object { .. } => false,
        }
    }
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

// The only conversions of a stat result into a stamp or metadata: from `fstatat` (`rustix`)
// where the walkers and the local replica stat, from `std` where a file was opened through
// `std::fs`. A directory's stamp has size 0: its `st_size` says nothing stable.

/// A stat timestamp (seconds, nanoseconds) as a [`Time`].
fn stamp(sec: i64, nsec: u32) -> Time {
    Time { sec, nsec }
}

impl Stamp {
    /// The POSIX stamp of a stat result.
    pub fn of(st: &rustix::fs::Stat) -> Stamp {
        let is_dir = rustix::fs::FileType::from_raw_mode(st.st_mode).is_dir();
        Stamp::Posix {
            size: if is_dir { 0 } else { st.st_size as u64 },
            mtime: stamp(st.st_mtime, st.st_mtime_nsec as u32),
            ctime: stamp(st.st_ctime, st.st_ctime_nsec as u32),
            ino: st.st_ino,
            dev: st.st_dev,
        }
    }

    /// The POSIX stamp of `std` metadata.
    pub fn of_metadata(md: &std::fs::Metadata) -> Stamp {
        Stamp::Posix {
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

/// Time, stamp and metadata encode as fixed-width little-endian byte strings: one read per
/// group instead of a dozen variable-length integers.
pub(crate) use fixed::PosixV2;

mod fixed {
    use super::{Meta, Stamp, Time};
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

    /// Tags of the stamp variants in the encoding (schema 3): the first byte of the record.
    const POSIX: u8 = 0;
    const SECONDS: u8 = 1;
    const OBJECT: u8 = 2;

    impl Out<49> {
        fn posix(&mut self, s: &Stamp) -> &mut Self {
            if let Stamp::Posix {
                size,
                mtime,
                ctime,
                ino,
                dev,
            } = *s
            {
                self.put(&size.to_le_bytes()).time(mtime).time(ctime);
                self.put(&ino.to_le_bytes()).put(&dev.to_le_bytes());
            }
            self
        }
    }

    impl In<'_> {
        fn posix(&mut self) -> Stamp {
            Stamp::Posix {
                size: self.u64(),
                mtime: self.time(),
                ctime: self.time(),
                ino: self.u64(),
                dev: self.u64(),
            }
        }
    }

    /// A stamp is one byte string: its variant's tag, then the variant's fields at fixed
    /// widths, so a record decodes with one length check and one branch.
    impl Serialize for Stamp {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            let mut o = Out::<49>::new();
            match *self {
                Stamp::Posix { .. } => o.put(&[POSIX]).posix(self),
                Stamp::Seconds { size, mtime } => o
                    .put(&[SECONDS])
                    .put(&size.to_le_bytes())
                    .put(&mtime.to_le_bytes()),
                Stamp::Object { size, etag } => {
                    o.put(&[OBJECT]).put(&size.to_le_bytes()).put(&etag)
                }
            };
            s.serialize_bytes(&o.0[..o.1])
        }
    }

    impl<'de> Deserialize<'de> for Stamp {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            let b = <&'de [u8]>::deserialize(d)?;
            let mut i = In(b.get(1..).unwrap_or_default());
            Ok(match (b.first(), b.len()) {
                (Some(&POSIX), 49) => i.posix(),
                (Some(&SECONDS), 17) => Stamp::Seconds {
                    size: i.u64(),
                    mtime: i.u64() as i64,
                },
                (Some(&OBJECT), 41) => Stamp::Object {
                    size: i.u64(),
                    etag: i.take(),
                },
                _ => {
                    return Err(serde::de::Error::invalid_value(
                        serde::de::Unexpected::Bytes(b),
                        &"a stamp record (a known variant tag and its length)",
                    ));
                }
            })
        }
    }

    /// A POSIX stamp in the encoding of index schema 2: the five fields at fixed widths
    /// (48 bytes), without a tag. Only read, to migrate or show such an index.
    #[derive(Clone, Copy, PartialEq, Eq, Debug)]
    pub struct PosixV2(pub Stamp);

    impl<'de> Deserialize<'de> for PosixV2 {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            Ok(PosixV2(read(d, 48)?.posix()))
        }
    }

    /// The schema-2 encoder, kept for tests that make indexes as the release before wrote them.
    #[cfg(test)]
    impl Serialize for PosixV2 {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            let mut o = Out::<49>::new();
            o.posix(&self.0);
            s.serialize_bytes(&o.0[..48])
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

        fn entry(fp: Stamp) -> Entry {
            let t = |sec, nsec| Time { sec, nsec };
            Entry {
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
                fp,
                seen: t(1_800_000_000, 5),
                link: Some(RelPath::from_bytes(b"a/b").unwrap()),
            }
        }

        fn every_variant() -> [Stamp; 3] {
            let t = |sec, nsec| Time { sec, nsec };
            [
                Stamp::Posix {
                    size: 1 << 40,
                    mtime: t(i64::MIN, 1),
                    ctime: t(i64::MAX, 2),
                    ino: 9,
                    dev: u64::MAX,
                },
                Stamp::Seconds {
                    size: u64::MAX,
                    mtime: -1,
                },
                Stamp::Object {
                    size: 3,
                    etag: [0xa5; 32],
                },
            ]
        }

        #[test]
        fn entries_round_trip_through_postcard_for_every_stamp_variant() {
            for fp in every_variant() {
                let e = entry(fp);
                let bytes = postcard::to_stdvec(&e).unwrap();
                assert_eq!(postcard::from_bytes::<Entry>(&bytes).unwrap(), e, "{fp:?}");
                let cut = &bytes[..bytes.len() - 5];
                assert!(postcard::from_bytes::<Entry>(cut).is_err(), "{fp:?}");
            }
        }

        #[test]
        fn a_stamp_record_carries_its_variant_and_is_refused_under_another() {
            let lens: Vec<usize> = every_variant()
                .iter()
                .map(|fp| postcard::to_stdvec(fp).unwrap().len())
                .collect();
            // A one-byte length prefix, the tag, then the fields.
            assert_eq!(lens, [1 + 49, 1 + 17, 1 + 41]);
            let mut posix = postcard::to_stdvec(&every_variant()[0]).unwrap();
            posix[1] = 2; // tagged as an object stamp, with a POSIX stamp's length
            assert!(postcard::from_bytes::<Stamp>(&posix).is_err());
            posix[1] = 9;
            assert!(
                postcard::from_bytes::<Stamp>(&posix).is_err(),
                "unknown tag"
            );
        }

        #[test]
        fn a_schema_2_stamp_reads_as_the_same_posix_stamp() {
            let fp = every_variant()[0];
            let v2 = postcard::to_stdvec(&PosixV2(fp)).unwrap();
            assert_eq!(v2.len(), 1 + 48);
            assert_eq!(postcard::from_bytes::<PosixV2>(&v2).unwrap(), PosixV2(fp));
            assert!(postcard::from_bytes::<Stamp>(&v2).is_err(), "untagged");
            let v3 = postcard::to_stdvec(&fp).unwrap();
            assert!(postcard::from_bytes::<PosixV2>(&v3).is_err(), "tagged");
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
    /// The stamp of the node the content was read from.
    pub fp: Stamp,
    /// When `fp` was taken, before the content was read; decides whether the entry is racily
    /// clean (see [`Entry::is_racy`]).
    pub seen: Time,
    /// For a file with other hard links in the same tree: the first of its paths in canonical
    /// order, when that is not this path.
    pub link: Option<RelPath>,
}

/// How close to the moment it was read a node may have changed and still keep its stamp on
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
    /// An object stamp is never racy: its ETag changes with every write.
    pub fn is_racy(&self, window_ns: i128) -> bool {
        self.fp
            .changed_ns()
            .is_some_and(|changed| changed + window_ns > self.seen.as_nanos())
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
    fn racy_entries_are_those_changed_within_the_window_before_they_were_read_for_each_stamp() {
        let at = |sec: i64, nsec: u32| Time { sec, nsec };
        let mut e = Entry {
            content: Content::File {
                size: 1,
                hash: Some([0; 32]),
            },
            meta: Meta::default(),
            fp: Stamp::Posix {
                size: 1,
                mtime: at(100, 0),
                ctime: at(100, 0),
                ino: 1,
                dev: 1,
            },
            seen: at(100, 5_000_000),
            link: None,
        };
        assert!(e.is_racy(RACY_WINDOW_FINE_NS), "read 5 ms after a change");
        e.seen = at(100, 30_000_000);
        assert!(!e.is_racy(RACY_WINDOW_FINE_NS), "read 30 ms after");
        assert!(e.is_racy(RACY_WINDOW_NS), "but within two seconds");
        if let Stamp::Posix { ctime, .. } = &mut e.fp {
            *ctime = at(100, 29_000_000);
        }
        assert!(e.is_racy(RACY_WINDOW_FINE_NS), "a ctime change counts too");
        e.fp = Stamp::Seconds {
            size: 1,
            mtime: 100,
        };
        assert!(
            e.is_racy(RACY_WINDOW_NS),
            "whole seconds: within two seconds"
        );
        e.seen = at(103, 0);
        assert!(!e.is_racy(RACY_WINDOW_NS), "three seconds after");
        e.seen = at(0, 0);
        e.fp = Stamp::Object {
            size: 1,
            etag: [1; 32],
        };
        assert!(
            !e.is_racy(RACY_WINDOW_NS),
            "an ETag changes with every write"
        );
    }

    #[test]
    fn display_escapes_non_utf8() {
        let r = RelPath::from_bytes(b"caf\xe9/\xc3\xa9\n").unwrap();
        assert_eq!(r.to_string(), "caf\\xe9/\u{e9}\\x0a");
    }
}
