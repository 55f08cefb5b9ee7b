//! What a replica's filesystem keeps of a node's metadata, found out by trying it once: the
//! granularity of its timestamps (nanoseconds on ext4 with large inodes, tmpfs, xfs, btrfs;
//! whole seconds on ext4 made with `-I 128`; two seconds on FAT) and whether names differ only in
//! case. Comparisons of replica metadata are made at that precision, so a filesystem that keeps
//! less than the source has never shows a change that no sync can make go away.

use std::ffi::OsStr;
use std::os::fd::BorrowedFd;
use std::os::unix::ffi::OsStrExt;

use rustix::fs::{self as rfs, AtFlags, Mode, OFlags, Timespec, Timestamps};

use super::TMP_PREFIX;
use crate::entry::{Meta, Time};

/// What a replica filesystem keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FsTraits {
    /// Timestamps are kept to a multiple of this many nanoseconds (1 = exact).
    pub mtime_grain_ns: u32,
    /// `A` and `a` name the same node.
    pub case_insensitive: bool,
}

impl Default for FsTraits {
    fn default() -> Self {
        FsTraits {
            mtime_grain_ns: 1,
            case_insensitive: false,
        }
    }
}

/// The granularities a filesystem may keep, finest first.
const GRAINS: [u32; 5] = [1, 1_000, 1_000_000, 1_000_000_000, 2_000_000_000];

/// A time that every granularity of [`GRAINS`] changes: odd seconds, nanoseconds all nines.
const PROBE_TIME: Time = Time {
    sec: 1_000_000_001,
    nsec: 999_999_999,
};

impl FsTraits {
    /// `t` as this filesystem would keep it (rounded down to the grain).
    pub fn keep(&self, t: Time) -> Time {
        floor(t, self.mtime_grain_ns)
    }

    /// Encodes for the index: grain (u32 LE), then one flag byte.
    pub fn to_bytes(self) -> Vec<u8> {
        let mut b = self.mtime_grain_ns.to_le_bytes().to_vec();
        b.push(u8::from(self.case_insensitive));
        b
    }

    pub fn from_bytes(b: &[u8]) -> Option<FsTraits> {
        let (grain, rest) = b.split_first_chunk::<4>()?;
        let grain = u32::from_le_bytes(*grain);
        if !GRAINS.contains(&grain) || rest.len() != 1 || rest[0] > 1 {
            return None;
        }
        Some(FsTraits {
            mtime_grain_ns: grain,
            case_insensitive: rest[0] == 1,
        })
    }
}

fn floor(t: Time, grain: u32) -> Time {
    if grain <= 1 {
        return t;
    }
    let g = i128::from(grain);
    let ns = t.as_nanos().div_euclid(g) * g;
    Time {
        sec: ns.div_euclid(1_000_000_000) as i64,
        nsec: ns.rem_euclid(1_000_000_000) as u32,
    }
}

/// The granularity that explains what the filesystem kept of [`PROBE_TIME`]; the coarsest one
/// when none does (a filesystem that rounds up, or keeps less still).
fn grain_of(kept: Time) -> u32 {
    GRAINS
        .into_iter()
        .find(|&g| floor(PROBE_TIME, g) == kept)
        .unwrap_or(GRAINS[GRAINS.len() - 1])
}

/// Finds out what the filesystem of the directory `dir` keeps, with a temporary file that is
/// removed again. Errors (a read-only replica, say) leave the defaults: they are what a replica
/// that cannot be written needs least.
pub fn probe(dir: BorrowedFd<'_>) -> FsTraits {
    let name = format!("{TMP_PREFIX}probe-{}", std::process::id());
    let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::CLOEXEC | OFlags::NOFOLLOW;
    let Ok(fd) = rfs::openat(dir, OsStr::new(&name), flags, Mode::from_raw_mode(0o600)) else {
        return FsTraits::default();
    };
    let stamp = Timespec {
        tv_sec: PROBE_TIME.sec,
        tv_nsec: PROBE_TIME.nsec as _,
    };
    let times = Timestamps {
        last_access: stamp,
        last_modification: stamp,
    };
    let grain = rfs::futimens(&fd, &times)
        .and_then(|_| rfs::fstat(&fd))
        .map(|st| grain_of(Meta::of(&st).mtime))
        .unwrap_or(1);
    let upper = name.to_ascii_uppercase();
    let case_insensitive = upper != name
        && rfs::statat(
            dir,
            OsStr::from_bytes(upper.as_bytes()),
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .is_ok_and(|st| rfs::fstat(&fd).is_ok_and(|me| me.st_ino == st.st_ino));
    let _ = rfs::unlinkat(dir, OsStr::new(&name), AtFlags::empty());
    FsTraits {
        mtime_grain_ns: grain,
        case_insensitive,
    }
}

/// A name as a case-insensitive filesystem compares it: lowercased where it is UTF-8 (its
/// invalid bytes as they are).
fn folded(name: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(name.len());
    for chunk in name.utf8_chunks() {
        out.extend(chunk.valid().to_lowercase().as_bytes());
        out.extend(chunk.invalid());
    }
    out
}

/// The positions of the names in one directory listing that another name of it equals but for
/// case: on a case-insensitive replica they would all land on one node, so none of them can be
/// replicated faithfully.
pub fn case_collisions(names: &[&[u8]]) -> Vec<usize> {
    let mut by_fold: std::collections::HashMap<Vec<u8>, Vec<usize>> =
        std::collections::HashMap::new();
    for (i, n) in names.iter().enumerate() {
        by_fold.entry(folded(n)).or_default().push(i);
    }
    let mut out: Vec<usize> = by_fold
        .into_values()
        .filter(|v| v.len() > 1)
        .flatten()
        .collect();
    out.sort_unstable();
    out
}

/// [`probe`], then gives `dir` back the access and modification times it had: the temporary file
/// changed them, and a directory's mtime is replicated.
pub fn probe_keeping_times(dir: BorrowedFd<'_>) -> FsTraits {
    let before = rfs::fstat(dir);
    let traits = probe(dir);
    if let Ok(st) = before {
        let times = Timestamps {
            last_access: Timespec {
                tv_sec: st.st_atime,
                tv_nsec: st.st_atime_nsec as _,
            },
            last_modification: Timespec {
                tv_sec: st.st_mtime,
                tv_nsec: st.st_mtime_nsec as _,
            },
        };
        let _ = rfs::futimens(dir, &times);
    }
    traits
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_equal_but_for_case_collide_all_of_them() {
        let names: [&[u8]; 6] = [b"A.txt", b"b", b"a.TXT", b"\xc3\x84", b"\xc3\xa4", b"a.txt"];
        assert_eq!(case_collisions(&names), [0, 2, 3, 4, 5]);
        let names: [&[u8]; 3] = [b"a", b"b", b"\xff"];
        assert!(case_collisions(&names).is_empty());
    }

    fn t(sec: i64, nsec: u32) -> Time {
        Time { sec, nsec }
    }

    #[test]
    fn each_granularity_is_recognised_from_what_was_kept() {
        assert_eq!(grain_of(PROBE_TIME), 1);
        assert_eq!(grain_of(t(1_000_000_001, 999_999_000)), 1_000);
        assert_eq!(grain_of(t(1_000_000_001, 999_000_000)), 1_000_000);
        assert_eq!(grain_of(t(1_000_000_001, 0)), 1_000_000_000);
        assert_eq!(grain_of(t(1_000_000_000, 0)), 2_000_000_000);
        assert_eq!(grain_of(t(1_000_000_002, 0)), 2_000_000_000, "rounded up");
    }

    #[test]
    fn keeping_rounds_down_also_before_1970() {
        let s = FsTraits {
            mtime_grain_ns: 1_000_000_000,
            ..FsTraits::default()
        };
        assert_eq!(s.keep(t(5, 123)), t(5, 0));
        assert_eq!(s.keep(t(-5, 123)), t(-5, 0));
        let fat = FsTraits {
            mtime_grain_ns: 2_000_000_000,
            ..FsTraits::default()
        };
        assert_eq!(fat.keep(t(7, 1)), t(6, 0));
        assert_eq!(fat.keep(t(-1, 0)), t(-2, 0));
        assert_eq!(FsTraits::default().keep(t(7, 1)), t(7, 1));
    }

    #[test]
    fn traits_round_trip_and_bad_bytes_are_refused() {
        let s = FsTraits {
            mtime_grain_ns: 2_000_000_000,
            case_insensitive: true,
        };
        assert_eq!(FsTraits::from_bytes(&s.to_bytes()), Some(s));
        assert_eq!(FsTraits::from_bytes(&[7, 0, 0, 0, 0]), None);
        assert_eq!(FsTraits::from_bytes(&[1, 0, 0, 0]), None);
    }

    #[test]
    fn a_tmpfs_or_ext4_directory_keeps_nanoseconds() {
        let dir = tempfile::tempdir().unwrap();
        let fd = std::fs::File::open(dir.path()).unwrap();
        use std::os::fd::AsFd;
        let before = std::fs::metadata(dir.path()).unwrap().modified().unwrap();
        let traits = probe_keeping_times(fd.as_fd());
        let after = std::fs::metadata(dir.path()).unwrap().modified().unwrap();
        assert_eq!(before, after, "the probe changed the directory's mtime");
        assert_eq!(traits.mtime_grain_ns, 1);
        assert!(!traits.case_insensitive);
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "probe file left"
        );
    }
}
