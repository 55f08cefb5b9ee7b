//! The conformance suite every [`Replica`] implementation runs: one set of checks of the
//! contract in [`super`] and of what the apply loop relies on, as restic runs one test suite
//! against every storage backend. A backend passes it by handing [`run`] a factory of fresh,
//! empty [`Subject`]s: the replica under test plus a read-back of what it holds that does not go
//! through the [`Replica`] trait (for a local directory, `std::fs`; for memory, its own
//! inspection methods; for a remote store, its own listing), so a backend cannot pass by
//! agreeing with itself.
//!
//! It lives in the library behind the `conformance` cargo feature, not under `cfg(test)`:
//! `cfg(test)` is invisible to integration tests and to another crate's backend, which must call
//! the very same checks; the feature keeps the suite out of a normal build (every test build of
//! this package turns it on, see `Cargo.toml`). Failures panic with the check and path named.

use std::io::{self, Read};
use std::panic::{AssertUnwindSafe, catch_unwind};

use super::{Replica, TMP_PREFIX, Written};
use crate::entry::{Content, Hash, Kind, Meta, RelPath, Stamp, Time};

/// A node as the backend's own read-back sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    pub kind: Kind,
    /// A file's bytes or a symlink's target; empty for a directory.
    pub data: Vec<u8>,
    /// Mode bits (`& 0o7777`), mtime and owner.
    pub meta: Meta,
    pub fp: Stamp,
}

/// One fresh, empty replica under test and an independent view of what it holds.
pub trait Subject {
    fn replica(&self) -> &dyn Replica;
    /// Whether the replica applies `uid` and `gid` of [`Meta`].
    fn owners(&self) -> bool;
    /// The node at `path`, without following a symlink; `None` if there is none.
    fn seen(&self, path: &RelPath) -> Option<Seen>;
    /// The names in directory `dir`, sorted by their bytes.
    fn names(&self, dir: &RelPath) -> Vec<Vec<u8>>;
    /// Bit rot: changes a byte of the file at `path` and keeps its length.
    fn rot(&self, path: &RelPath);
    /// A symlink target naming a directory outside the replica that holds a file `f` and an
    /// empty directory `d`; the suite plants symlinks to it (and to `f` in it).
    fn outside(&self) -> Vec<u8>;
    /// Everything outside the replica the suite could reach through a followed symlink, in a
    /// form compared before and after.
    fn outside_state(&self) -> String;
    /// The (device, inode) of the replica root as the read-back sees it, where a local tree
    /// could show the replica; `None` for a replica no local tree can show.
    fn identity(&self) -> Option<(u64, u64)>;
}

/// Makes a fresh, empty subject for each check.
pub type Factory<'a> = &'a dyn Fn() -> Box<dyn Subject>;

/// One check of the suite: panics if the subjects `new` makes break the contract.
pub type Conformance = fn(Factory);

/// Every check, by name.
pub const CHECKS: &[(&str, Conformance)] = &[
    (
        "write_file_puts_the_bytes_and_meta",
        write_file_puts_the_bytes_and_meta,
    ),
    (
        "write_file_replaces_atomically",
        write_file_replaces_atomically,
    ),
    (
        "a_refused_write_keeps_the_old_node",
        a_refused_write_keeps_the_old_node,
    ),
    (
        "copy_file_copies_and_checks_its_bytes",
        copy_file_copies_and_checks_its_bytes,
    ),
    (
        "a_rotten_copy_source_is_caught",
        a_rotten_copy_source_is_caught,
    ),
    (
        "rename_moves_files_and_whole_dirs",
        rename_moves_files_and_whole_dirs,
    ),
    (
        "remove_takes_only_what_it_names",
        remove_takes_only_what_it_names,
    ),
    ("mkdir_is_idempotent", mkdir_is_idempotent),
    ("symlink_targets_are_verbatim", symlink_targets_are_verbatim),
    ("hard_link_shares_the_inode", hard_link_shares_the_inode),
    ("set_meta_on_every_kind", set_meta_on_every_kind),
    ("stat_fingerprints_are_stable", stat_fingerprints_are_stable),
    ("names_of_every_kind", names_of_every_kind),
    (
        "a_planted_symlink_is_never_followed",
        a_planted_symlink_is_never_followed,
    ),
    (
        "batch_writes_land_where_named",
        batch_writes_land_where_named,
    ),
];

/// The checks of the read methods (`walk`, `hash`, `open`, `identity`). They write only what
/// the replica declares it can hold ([`Replica::capabilities`]), so every backend, whatever
/// its profile, runs them.
pub const READ_CHECKS: &[(&str, Conformance)] = &[
    (
        "walk_lists_every_node_in_canonical_order_stat_only",
        walk_lists_every_node_in_canonical_order_stat_only,
    ),
    (
        "hash_equals_an_independent_read",
        hash_equals_an_independent_read,
    ),
    (
        "open_reads_the_bytes_and_refuses_what_is_not_a_file",
        open_reads_the_bytes_and_refuses_what_is_not_a_file,
    ),
    (
        "identity_is_the_root_node_as_seen",
        identity_is_the_root_node_as_seen,
    ),
];

/// Runs every check ([`CHECKS`] and [`READ_CHECKS`]), each on a fresh subject, and panics naming
/// all that failed.
pub fn run(new: Factory) {
    run_checks(CHECKS, new);
    run_checks(READ_CHECKS, new);
}

/// Runs the [`READ_CHECKS`] only: for a backend that cannot do all that [`CHECKS`] asks of a
/// POSIX directory.
pub fn run_reads(new: Factory) {
    run_checks(READ_CHECKS, new);
}

fn run_checks(checks: &[(&str, Conformance)], new: Factory) {
    let failed: Vec<&str> = checks
        .iter()
        .filter(|(_, check)| catch_unwind(AssertUnwindSafe(|| check(new))).is_err())
        .map(|(name, _)| *name)
        .collect();
    assert!(failed.is_empty(), "conformance checks failed: {failed:?}");
}

pub fn p(s: &[u8]) -> RelPath {
    RelPath::from_bytes(s).expect("a valid path")
}

fn meta(mode: u32, sec: i64, nsec: u32) -> Meta {
    Meta {
        mode,
        mtime: Time { sec, nsec },
        uid: 1234,
        gid: 5678,
    }
}

fn hash(data: &[u8]) -> Hash {
    *blake3::hash(data).as_bytes()
}

fn ok(_: &Hash, _: u64) -> io::Result<()> {
    Ok(())
}

fn write(s: &dyn Subject, path: &RelPath, data: &[u8], m: &Meta) -> io::Result<Written> {
    s.replica().write_file(path, &mut &data[..], m, &mut ok)
}

fn must_write(s: &dyn Subject, path: &[u8], data: &[u8], m: &Meta) -> Written {
    write(s, &p(path), data, m).unwrap_or_else(|e| panic!("write_file {}: {e}", p(path)))
}

fn seen(s: &dyn Subject, path: &RelPath) -> Seen {
    s.seen(path)
        .unwrap_or_else(|| panic!("{path} is missing from the replica"))
}

/// `path` is a file holding `data` with `m` applied (owners only where the replica sets them).
fn assert_file(s: &dyn Subject, path: &RelPath, data: &[u8], m: &Meta) -> Seen {
    let n = seen(s, path);
    assert_eq!(n.kind, Kind::File, "{path} is a file");
    assert_eq!(n.data, data, "{path} holds the bytes written");
    assert_meta(s, path, &n.meta, m);
    n
}

fn assert_meta(s: &dyn Subject, path: &RelPath, got: &Meta, want: &Meta) {
    assert_eq!(got.mode, want.mode, "{path}: mode");
    assert_eq!(got.mtime, want.mtime, "{path}: mtime to the nanosecond");
    if s.owners() {
        assert_eq!((got.uid, got.gid), (want.uid, want.gid), "{path}: owner");
    }
}

fn assert_written(s: &dyn Subject, path: &RelPath, w: &Written, data: &[u8]) {
    assert_eq!(
        w.hash,
        hash(data),
        "{path}: the hash returned is of the bytes"
    );
    assert_eq!(w.len, data.len() as u64, "{path}: the length returned");
    assert_eq!(
        w.fp,
        seen(s, path).fp,
        "{path}: the fingerprint of the file in place"
    );
}

/// No temporary node is left in `dir`: its names are exactly `want`.
fn assert_names(s: &dyn Subject, dir: &[u8], want: &[&[u8]]) {
    let got = s.names(&p(dir));
    assert_eq!(got, want, "names in {:?}", p(dir));
}

fn is_tmp(name: &[u8]) -> bool {
    name.starts_with(TMP_PREFIX.as_bytes())
}

/// A reader that hands out `data` in small pieces and calls `probe` once, in the middle.
struct Probing<'a> {
    data: &'a [u8],
    at: usize,
    probe: Option<Box<dyn FnOnce() + 'a>>,
}

impl Read for Probing<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.at >= self.data.len() / 2
            && let Some(probe) = self.probe.take()
        {
            probe();
        }
        let n = buf.len().min(4096).min(self.data.len() - self.at);
        buf[..n].copy_from_slice(&self.data[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

fn big(len: usize, salt: u32) -> Vec<u8> {
    (0..len as u32)
        .map(|i| (i ^ (i >> 11) ^ salt) as u8)
        .collect()
}

pub fn write_file_puts_the_bytes_and_meta(new: Factory) {
    let s = &*new();
    let r = s.replica();
    r.mkdir(&p(b"d")).expect("mkdir d");
    let m = meta(0o640, 1_600_000_000, 123_456_789);
    let large = big((3 << 20) + 17, 1);
    for (path, data) in [
        (&b"d/empty"[..], &b""[..]),
        (b"d/small", b"hello"),
        (b"top", &large[..]),
    ] {
        let w = must_write(s, path, data, &m);
        assert_file(s, &p(path), data, &m);
        assert_written(s, &p(path), &w, data);
    }
    let odd = meta(0o4751, -5, 999_999_999);
    let w = must_write(s, b"d/odd", b"x", &odd);
    assert_file(s, &p(b"d/odd"), b"x", &odd);
    assert_written(s, &p(b"d/odd"), &w, b"x");
    assert_names(s, b"d", &[b"empty", b"odd", b"small"]);
    assert_names(s, b"", &[b"d", b"top"]);
    assert!(
        write(s, &p(b"missing/f"), b"x", &m).is_err(),
        "a write below a missing directory fails"
    );
    assert!(
        write(s, &p(b"d"), b"x", &m).is_err(),
        "a file never replaces a directory"
    );
    assert_eq!(seen(s, &p(b"d")).kind, Kind::Dir);
    assert_names(s, b"", &[b"d", b"top"]);
}

pub fn write_file_replaces_atomically(new: Factory) {
    let s = &*new();
    let (m1, m2) = (meta(0o644, 1_000, 1), meta(0o600, 2_000, 2));
    let old = big(200_000, 7);
    must_write(s, b"f", &old, &m1);
    let newer = big(300_000, 9);
    let mut mid: Option<(Option<Seen>, Vec<Vec<u8>>)> = None;
    let mut at_check = None;
    let w = {
        let mut reader = Probing {
            data: &newer,
            at: 0,
            probe: Some(Box::new(|| {
                mid = Some((s.seen(&p(b"f")), s.names(&p(b""))))
            })),
        };
        s.replica()
            .write_file(&p(b"f"), &mut reader, &m2, &mut |_, _| {
                at_check = s.seen(&p(b"f"));
                Ok(())
            })
            .expect("write_file over a file")
    };
    let (during, names) = mid.expect("the reader was read");
    assert_eq!(
        during.map(|n| n.data),
        Some(old.clone()),
        "mid-write: the old bytes"
    );
    assert_eq!(
        at_check.map(|n| n.data),
        Some(old),
        "at the check: the old bytes"
    );
    let visible: Vec<_> = names.into_iter().filter(|n| !is_tmp(n)).collect();
    assert_eq!(
        visible,
        [b"f"],
        "mid-write, only the old name and temporary ones"
    );
    assert_file(s, &p(b"f"), &newer, &m2);
    assert_written(s, &p(b"f"), &w, &newer);
    assert_names(s, b"", &[b"f"]);
    // Over a symlink: the link is replaced, not followed.
    s.replica().symlink(&p(b"l"), b"f", &m1).expect("symlink l");
    must_write(s, b"l", b"own bytes", &m1);
    assert_file(s, &p(b"l"), b"own bytes", &m1);
    assert_eq!(
        seen(s, &p(b"f")).data,
        newer,
        "the symlink's target is untouched"
    );
}

pub fn a_refused_write_keeps_the_old_node(new: Factory) {
    let s = &*new();
    let m = meta(0o644, 5, 5);
    must_write(s, b"old", b"kept", &m);
    let before = seen(s, &p(b"old"));
    for target in [&b"old"[..], b"new"] {
        let mut seen_check = None;
        let e = s
            .replica()
            .write_file(
                &p(target),
                &mut &b"changed"[..],
                &meta(0o600, 6, 6),
                &mut |h, n| {
                    seen_check = Some((*h, n));
                    Err(io::Error::other("changed while copied"))
                },
            )
            .expect_err("a refused write fails");
        assert_eq!(
            e.to_string(),
            "changed while copied",
            "the check's error comes back"
        );
        assert_eq!(
            seen_check,
            Some((hash(b"changed"), 7)),
            "the check saw the bytes"
        );
    }
    assert_eq!(seen(s, &p(b"old")), before, "the old node stays as it was");
    assert_names(s, b"", &[b"old"]);
}

pub fn copy_file_copies_and_checks_its_bytes(new: Factory) {
    let s = &*new();
    let r = s.replica();
    r.mkdir(&p(b"d")).expect("mkdir d");
    let m = meta(0o644, 10, 10);
    let data = big((1 << 20) + 3, 3);
    must_write(s, b"a", &data, &m);
    let before = seen(s, &p(b"a"));
    let mc = meta(0o600, 20, 20);
    let mut checked = None;
    let c = r
        .copy_file(&p(b"a"), &p(b"d/b"), &mc, &mut |h, n| {
            checked = Some((*h, n));
            Ok(())
        })
        .expect("copy_file a d/b");
    assert_eq!(
        checked,
        Some((hash(&data), data.len() as u64)),
        "the check saw the copy"
    );
    assert_file(s, &p(b"d/b"), &data, &mc);
    assert_written(s, &p(b"d/b"), &c, &data);
    assert_eq!(seen(s, &p(b"a")), before, "the copy source is untouched");
    assert_ne!(c.fp.node(), before.fp.node(), "a copy is a new inode");
    // Over an existing file.
    must_write(s, b"d/c", b"old", &m);
    let c = r
        .copy_file(&p(b"a"), &p(b"d/c"), &mc, &mut ok)
        .expect("copy over a file");
    assert_file(s, &p(b"d/c"), &data, &mc);
    assert_written(s, &p(b"d/c"), &c, &data);
    assert_names(s, b"d", &[b"b", b"c"]);
    assert!(
        r.copy_file(&p(b"nope"), &p(b"x"), &mc, &mut ok).is_err(),
        "a missing source"
    );
    assert!(
        r.copy_file(&p(b"d"), &p(b"x"), &mc, &mut ok).is_err(),
        "a directory source"
    );
    assert!(
        r.copy_file(&p(b"a"), &p(b"d"), &mc, &mut ok).is_err(),
        "onto a directory"
    );
    assert_eq!(seen(s, &p(b"d")).kind, Kind::Dir, "the directory stays");
    assert_names(s, b"", &[b"a", b"d"]);
}

pub fn a_rotten_copy_source_is_caught(new: Factory) {
    let s = &*new();
    let m = meta(0o644, 10, 10);
    let data = big(9 << 20, 5);
    let w = must_write(s, b"a", &data, &m);
    must_write(s, b"b", b"previous", &m);
    s.rot(&p(b"a"));
    let rotten = seen(s, &p(b"a")).data;
    assert_ne!(rotten, data, "the subject rotted the file");
    for to in [&b"b"[..], b"c"] {
        let mut checked = None;
        let e = s
            .replica()
            .copy_file(&p(b"a"), &p(to), &m, &mut |h, n| {
                checked = Some((*h, n));
                if *h == w.hash {
                    Ok(())
                } else {
                    Err(io::Error::other("rotten"))
                }
            })
            .expect_err("the rotten copy is refused");
        assert_eq!(e.to_string(), "rotten");
        let want = (hash(&rotten), rotten.len() as u64);
        assert_eq!(
            checked,
            Some(want),
            "the check saw the rotten bytes, not a recorded hash"
        );
    }
    assert_eq!(seen(s, &p(b"b")).data, b"previous", "the old file stays");
    assert_names(s, b"", &[b"a", b"b"]);
}

pub fn rename_moves_files_and_whole_dirs(new: Factory) {
    let s = &*new();
    let r = s.replica();
    let m = meta(0o644, 10, 10);
    for d in [&b"d"[..], b"d/e", b"x"] {
        r.mkdir(&p(d)).expect("mkdir");
    }
    must_write(s, b"d/e/f", b"deep", &m);
    must_write(s, b"d/g", b"top", &m);
    r.symlink(&p(b"d/l"), b"e/f", &m).expect("symlink");
    let ino = seen(s, &p(b"d/g")).fp.node();
    r.rename(&p(b"d/g"), &p(b"x/g2"))
        .expect("rename a file onto a free name");
    assert_file(s, &p(b"x/g2"), b"top", &m);
    assert_eq!(
        seen(s, &p(b"x/g2")).fp.node(),
        ino,
        "a rename keeps the inode"
    );
    assert!(s.seen(&p(b"d/g")).is_none());
    let stage = [TMP_PREFIX.as_bytes(), b"stage-1"].concat();
    r.rename(&p(b"d"), &p(&stage))
        .expect("stage a whole directory");
    assert!(s.seen(&p(b"d")).is_none());
    assert_eq!(seen(s, &p(&[&stage[..], b"/e/f"].concat())).data, b"deep");
    r.rename(&p(&stage), &p(b"x/d2"))
        .expect("unstage it elsewhere");
    assert_file(s, &p(b"x/d2/e/f"), b"deep", &m);
    assert_eq!(
        seen(s, &p(b"x/d2/l")).data,
        b"e/f",
        "a symlink moves with its directory"
    );
    assert_names(s, b"", &[b"x"]);
    assert_names(s, b"x", &[b"d2", b"g2"]);
    must_write(s, b"x/h", b"replaced", &m);
    r.rename(&p(b"x/g2"), &p(b"x/h"))
        .expect("rename a file over a file");
    assert_file(s, &p(b"x/h"), b"top", &m);
    assert!(r.rename(&p(b"gone"), &p(b"y")).is_err(), "a missing node");
    assert!(
        r.rename(&p(b"x"), &p(b"x/d2/in")).is_err(),
        "a directory below itself"
    );
    must_write(s, b"x/d2/e/g", b"", &m);
    assert!(
        r.rename(&p(b"x/h"), &p(b"x/d2")).is_err(),
        "a file over a directory"
    );
    assert!(
        r.rename(&p(b"x/d2"), &p(b"x/h")).is_err(),
        "a directory over a file"
    );
    assert_file(s, &p(b"x/h"), b"top", &m);
    assert_names(s, b"x/d2/e", &[b"f", b"g"]);
}

pub fn remove_takes_only_what_it_names(new: Factory) {
    let s = &*new();
    let r = s.replica();
    let m = meta(0o644, 10, 10);
    r.mkdir(&p(b"d")).expect("mkdir");
    r.mkdir(&p(b"e")).expect("mkdir");
    must_write(s, b"d/f", b"x", &m);
    must_write(s, b"f", b"x", &m);
    r.symlink(&p(b"l"), b"d", &m).expect("symlink to a dir");
    assert!(
        r.remove(&p(b"d"), Kind::Dir).is_err(),
        "a directory that is not empty"
    );
    assert!(
        r.remove(&p(b"d"), Kind::File).is_err(),
        "a directory as a file"
    );
    assert!(
        r.remove(&p(b"f"), Kind::Dir).is_err(),
        "a file as a directory"
    );
    assert!(
        r.remove(&p(b"l"), Kind::Dir).is_err(),
        "a symlink as a directory"
    );
    assert_names(s, b"", &[b"d", b"e", b"f", b"l"]);
    assert_names(s, b"d", &[b"f"]);
    r.remove(&p(b"l"), Kind::Symlink).expect("remove a symlink");
    assert_names(s, b"d", &[b"f"]);
    r.remove(&p(b"d/f"), Kind::File).expect("remove a file");
    r.remove(&p(b"d"), Kind::Dir)
        .expect("remove an empty directory");
    r.remove(&p(b"f"), Kind::File).expect("remove a file");
    assert!(
        r.remove(&RelPath::root(), Kind::Dir).is_err(),
        "the root is never removed"
    );
    assert!(
        r.rename(&p(b"e"), &RelPath::root()).is_err(),
        "nothing is renamed onto the root"
    );
    assert_names(s, b"", &[b"e"]);
    for kind in [Kind::File, Kind::Symlink, Kind::Dir] {
        r.remove(&p(b"missing"), kind)
            .expect("removing a missing node succeeds");
        r.remove(&p(b"e/missing"), kind)
            .expect("removing a missing node succeeds");
    }
    assert_names(s, b"", &[b"e"]);
}

pub fn mkdir_is_idempotent(new: Factory) {
    let s = &*new();
    let r = s.replica();
    r.mkdir(&p(b"d")).expect("mkdir");
    must_write(s, b"d/f", b"in", &meta(0o644, 1, 1));
    r.mkdir(&p(b"d"))
        .expect("mkdir of an existing directory succeeds");
    assert_names(s, b"d", &[b"f"]);
    r.mkdir(&p(b"d/e")).expect("mkdir nested");
    assert_eq!(seen(s, &p(b"d/e")).kind, Kind::Dir);
    assert!(r.mkdir(&p(b"d/f")).is_err(), "mkdir over a file");
    assert_eq!(seen(s, &p(b"d/f")).data, b"in");
    assert!(
        r.mkdir(&p(b"x/y")).is_err(),
        "mkdir below a missing directory"
    );
    r.mkdir(&RelPath::root())
        .expect("mkdir of the root, which exists, succeeds");
    assert_names(s, b"", &[b"d"]);
}

pub fn symlink_targets_are_verbatim(new: Factory) {
    let s = &*new();
    let r = s.replica();
    let m = meta(0o777, 1_500_000_000, 42);
    let long = vec![b'a'; 4000];
    let targets: [&[u8]; 6] = [
        b"plain",
        b"../../../etc/passwd",
        b"/absolute/elsewhere",
        b"new\nline and space ",
        b"\xff\xfe not utf-8 \xc3",
        &long,
    ];
    for (i, t) in targets.iter().enumerate() {
        let path = p(format!("l{i}").as_bytes());
        r.symlink(&path, t, &m)
            .unwrap_or_else(|e| panic!("symlink {path}: {e}"));
        let n = seen(s, &path);
        assert_eq!(n.kind, Kind::Symlink, "{path}");
        assert_eq!(n.data, *t, "{path}: the target, byte for byte");
        assert_eq!(n.meta.mtime, m.mtime, "{path}: the symlink's own mtime");
    }
    must_write(s, b"f", b"file", &meta(0o644, 1, 1));
    r.symlink(&p(b"f"), b"over a file", &m)
        .expect("a symlink replaces a file");
    assert_eq!(seen(s, &p(b"f")).data, b"over a file");
    r.symlink(&p(b"l0"), b"replaced", &m)
        .expect("a symlink replaces a symlink");
    assert_eq!(seen(s, &p(b"l0")).data, b"replaced");
    r.mkdir(&p(b"d")).expect("mkdir");
    assert!(
        r.symlink(&p(b"d"), b"x", &m).is_err(),
        "a symlink never replaces a directory"
    );
    assert_eq!(seen(s, &p(b"d")).kind, Kind::Dir);
    assert_eq!(s.names(&p(b"")).len(), 8, "no temporary is left");
}

pub fn hard_link_shares_the_inode(new: Factory) {
    let s = &*new();
    let r = s.replica();
    let m = meta(0o640, 100, 100);
    r.mkdir(&p(b"d")).expect("mkdir");
    must_write(s, b"a", b"shared", &m);
    must_write(s, b"d/b", b"replaced by the link", &m);
    for path in [&b"d/b"[..], b"c"] {
        let fp = r
            .hard_link(&p(b"a"), &p(path))
            .unwrap_or_else(|e| panic!("hard_link a {}: {e}", p(path)));
        let (a, b) = (seen(s, &p(b"a")), assert_file(s, &p(path), b"shared", &m));
        assert_eq!(b.fp.node(), a.fp.node(), "one inode");
        assert_eq!(fp, b.fp, "the fingerprint returned is the inode's now");
        assert_eq!(a.fp, b.fp, "both names show the same fingerprint");
    }
    r.hard_link(&p(b"a"), &p(b"c"))
        .expect("linking onto a link of the same inode");
    assert_file(s, &p(b"c"), b"shared", &m);
    let m2 = meta(0o600, 200, 200);
    r.set_meta(&p(b"c"), Kind::File, &m2)
        .expect("set_meta on a link");
    assert_file(s, &p(b"a"), b"shared", &m2);
    r.remove(&p(b"a"), Kind::File).expect("remove one link");
    assert_file(s, &p(b"d/b"), b"shared", &m2);
    assert!(
        r.hard_link(&p(b"gone"), &p(b"x")).is_err(),
        "a missing leader"
    );
    assert!(
        r.hard_link(&p(b"c"), &p(b"d")).is_err(),
        "a link never replaces a directory"
    );
    assert_names(s, b"", &[b"c", b"d"]);
    assert_names(s, b"d", &[b"b"]);
}

pub fn set_meta_on_every_kind(new: Factory) {
    let s = &*new();
    let r = s.replica();
    r.mkdir(&p(b"d")).expect("mkdir");
    must_write(s, b"d/f", b"x", &meta(0o644, 1, 1));
    r.symlink(&p(b"d/l"), b"f", &meta(0o777, 1, 1))
        .expect("symlink");
    let (mf, md, ml) = (
        meta(0o6711, 1_234_567_890, 987_654_321),
        meta(0o1750, 1_111_111_111, 1),
        meta(0o777, 1_222_222_222, 222_222_222),
    );
    let mr = meta(0o755, 1_333_333_333, 3);
    r.set_meta(&p(b"d/f"), Kind::File, &mf)
        .expect("set_meta file");
    r.set_meta(&p(b"d/l"), Kind::Symlink, &ml)
        .expect("set_meta symlink");
    r.set_meta(&p(b"d"), Kind::Dir, &md).expect("set_meta dir");
    r.set_meta(&RelPath::root(), Kind::Dir, &mr)
        .expect("set_meta root");
    assert_file(s, &p(b"d/f"), b"x", &mf);
    assert_meta(s, &p(b"d"), &seen(s, &p(b"d")).meta, &md);
    assert_meta(s, &RelPath::root(), &seen(s, &RelPath::root()).meta, &mr);
    let l = seen(s, &p(b"d/l"));
    assert_eq!(l.meta.mtime, ml.mtime, "the symlink's own mtime");
    if s.owners() {
        assert_eq!(
            (l.meta.uid, l.meta.gid),
            (ml.uid, ml.gid),
            "the symlink's own owner"
        );
    }
    assert_eq!(
        seen(s, &p(b"d/f")).meta,
        assert_file(s, &p(b"d/f"), b"x", &mf).meta
    );
    assert!(
        r.set_meta(&p(b"d/gone"), Kind::File, &mf).is_err(),
        "a missing node"
    );
    assert_eq!(mtime_of(&r.stat(&p(b"d/f")).expect("stat")), Some(mf.mtime));
}

/// The mtime a stamp holds (whole seconds for a seconds stamp); `None` for an object stamp.
fn mtime_of(fp: &Stamp) -> Option<Time> {
    match *fp {
        Stamp::Posix { mtime, .. } => Some(mtime),
        Stamp::Seconds { mtime, .. } => Some(Time {
            sec: mtime,
            nsec: 0,
        }),
        Stamp::Object { .. } => None,
    }
}

pub fn stat_fingerprints_are_stable(new: Factory) {
    let s = &*new();
    let r = s.replica();
    let m = meta(0o644, 77, 77);
    r.mkdir(&p(b"d")).expect("mkdir");
    let w = must_write(s, b"d/f", b"content", &m);
    r.symlink(&p(b"d/l"), b"f", &m).expect("symlink");
    for path in [&b""[..], b"d", b"d/f", b"d/l"] {
        let a = r
            .stat(&p(path))
            .unwrap_or_else(|e| panic!("stat {}: {e}", p(path)));
        let b = r.stat(&p(path)).expect("stat again");
        assert_eq!(a, b, "{}: two stats of an unchanged node agree", p(path));
        assert_eq!(
            a,
            seen(s, &p(path)).fp,
            "{}: stat matches the read-back",
            p(path)
        );
    }
    assert_eq!(r.stat(&p(b"d/f")).expect("stat").size(), 7);
    assert_eq!(
        r.stat(&p(b"d/l")).expect("stat").size(),
        1,
        "a symlink's own size"
    );
    assert_eq!(
        w.fp,
        r.stat(&p(b"d/f")).expect("stat"),
        "written fingerprint"
    );
    assert!(
        r.stat(&p(b"d/gone")).is_err(),
        "stat of a missing node fails"
    );
    r.set_meta(&p(b"d/f"), Kind::File, &meta(0o600, 78, 78))
        .expect("set_meta");
    let after = r.stat(&p(b"d/f")).expect("stat");
    assert_eq!(
        mtime_of(&after),
        Some(meta(0, 78, 78).mtime),
        "a new mtime shows in the fingerprint"
    );
    assert_eq!(after, seen(s, &p(b"d/f")).fp, "stat matches the read-back");
}

/// Names that a shell, a UTF-8 decoder or a path parser gets wrong.
fn odd_names() -> Vec<Vec<u8>> {
    vec![
        b"new\nline".to_vec(),
        b"-rf".to_vec(),
        b"--".to_vec(),
        b"\xff\xfe\x80".to_vec(),
        b" lead and trail ".to_vec(),
        b"back\\slash*?[".to_vec(),
        b"...".to_vec(),
        "ünï\u{301}cödé".as_bytes().to_vec(),
        vec![b'n'; 255],
        [&[0xc3u8][..], &[b'z'; 254]].concat(),
    ]
}

pub fn names_of_every_kind(new: Factory) {
    let s = &*new();
    let r = s.replica();
    let m = meta(0o644, 9, 9);
    for (i, name) in odd_names().iter().enumerate() {
        let dir = name.clone();
        r.mkdir(&p(&dir))
            .unwrap_or_else(|e| panic!("mkdir {}: {e}", p(&dir)));
        let file = [&dir[..], b"/", name].concat();
        let w = must_write(s, &file, name, &m);
        assert_written(s, &p(&file), &w, name);
        let link = [&dir[..], b"/l"].concat();
        r.symlink(&p(&link), name, &m).expect("symlink");
        assert_eq!(seen(s, &p(&link)).data, *name);
        let copy = [&dir[..], b"/c"].concat();
        r.copy_file(&p(&file), &p(&copy), &m, &mut ok)
            .expect("copy_file");
        let moved = format!("moved-{i}").into_bytes();
        r.rename(&p(&dir), &p(&moved)).expect("rename");
        let back = [&moved[..], b"/", name].concat();
        assert_file(s, &p(&back), name, &m);
        r.rename(&p(&moved), &p(&dir)).expect("rename back");
        let mut want: Vec<&[u8]> = vec![b"c", b"l", name];
        want.sort();
        assert_names(s, &dir, &want);
        for (n, kind) in [
            (&file, Kind::File),
            (&link, Kind::Symlink),
            (&copy, Kind::File),
        ] {
            r.remove(&p(n), kind).expect("remove");
        }
        r.remove(&p(&dir), Kind::Dir).expect("remove dir");
    }
    assert_names(s, b"", &[]);
}

/// What the suite tries through the symlink `l` (to the outside directory) and `lf` (to the
/// file `f` in it). Each must fail or act on the link itself.
fn through_links(s: &dyn Subject) {
    let r = s.replica();
    let m = meta(0o777, 3, 3);
    let fails = |what: &str, res: io::Result<()>| {
        assert!(res.is_err(), "{what} through a symlink must fail");
    };
    let drop = |w: io::Result<Written>| w.map(|_| ());
    fails("write_file l/f", drop(write(s, &p(b"l/f"), b"evil", &m)));
    fails(
        "write_file l/new",
        drop(write(s, &p(b"l/new"), b"evil", &m)),
    );
    fails("mkdir l/x", r.mkdir(&p(b"l/x")));
    fails("remove l/f", r.remove(&p(b"l/f"), Kind::File));
    fails("remove l/d", r.remove(&p(b"l/d"), Kind::Dir));
    fails("remove l as a directory", r.remove(&p(b"l"), Kind::Dir));
    fails("rename l/f", r.rename(&p(b"l/f"), &p(b"stolen")));
    fails("rename into l", r.rename(&p(b"own"), &p(b"l/own")));
    fails(
        "copy_file into l",
        drop(r.copy_file(&p(b"own"), &p(b"l/c"), &m, &mut ok)),
    );
    fails(
        "copy_file from l",
        drop(r.copy_file(&p(b"l/f"), &p(b"c"), &m, &mut ok)),
    );
    fails(
        "copy_file from lf",
        drop(r.copy_file(&p(b"lf"), &p(b"c"), &m, &mut ok)),
    );
    fails("symlink l/s", r.symlink(&p(b"l/s"), b"x", &m));
    fails(
        "hard_link into l",
        r.hard_link(&p(b"own"), &p(b"l/h")).map(|_| ()),
    );
    fails(
        "hard_link from l",
        r.hard_link(&p(b"l/f"), &p(b"h")).map(|_| ()),
    );
    fails("set_meta l/f", r.set_meta(&p(b"l/f"), Kind::File, &m));
    fails("set_meta l/d", r.set_meta(&p(b"l/d"), Kind::Dir, &m));
    fails("stat l/f", r.stat(&p(b"l/f")).map(|_| ()));
    // The link in the middle of the path, not only at its parent.
    fails(
        "write_file l/d/new",
        drop(write(s, &p(b"l/d/new"), b"evil", &m)),
    );
    fails("mkdir l/d/x", r.mkdir(&p(b"l/d/x")));
    fails("symlink l/d/s", r.symlink(&p(b"l/d/s"), b"x", &m));
    fails("rename into l/d", r.rename(&p(b"own"), &p(b"l/d/own")));
    fails(
        "copy_file into l/d",
        drop(r.copy_file(&p(b"own"), &p(b"l/d/c"), &m, &mut ok)),
    );
    fails(
        "hard_link into l/d",
        r.hard_link(&p(b"own"), &p(b"l/d/h")).map(|_| ()),
    );
    // On the links themselves: they act on the link, never on what it names.
    let _ = r.set_meta(&p(b"l"), Kind::Symlink, &m);
    let _ = r.set_meta(&p(b"lf"), Kind::Symlink, &m);
    let _ = r.set_meta(&p(b"lf"), Kind::File, &m);
    let _ = r.set_meta(&p(b"l"), Kind::Dir, &m);
}

pub fn a_planted_symlink_is_never_followed(new: Factory) {
    let s = &*new();
    let r = s.replica();
    let m = meta(0o777, 3, 3);
    let outside = s.outside();
    let before = s.outside_state();
    r.symlink(&p(b"l"), &outside, &m).expect("symlink l");
    r.symlink(&p(b"lf"), &[&outside[..], b"/f"].concat(), &m)
        .expect("symlink lf");
    must_write(s, b"own", b"own", &meta(0o644, 1, 1));
    through_links(s);
    assert_eq!(
        s.outside_state(),
        before,
        "nothing outside the replica changed"
    );
    assert_eq!(
        seen(s, &p(b"l")).data,
        outside,
        "the planted link is still a link"
    );
    assert_names(s, b"", &[b"l", b"lf", b"own"]);
    let fp = r.stat(&p(b"l")).expect("stat of the link itself");
    assert_eq!(
        fp.size(),
        outside.len() as u64,
        "stat does not follow the link"
    );
    assert!(
        r.mkdir(&p(b"l")).is_err(),
        "mkdir onto a symlink to a directory"
    );
    let own = meta(0o644, 1, 1);
    must_write(s, b"lf", b"replaces the link", &own);
    assert_eq!(
        seen(s, &p(b"lf")).kind,
        Kind::File,
        "a write replaces the link"
    );
    r.symlink(&p(b"lf2"), &[&outside[..], b"/f"].concat(), &m)
        .expect("symlink lf2");
    r.copy_file(&p(b"own"), &p(b"lf2"), &own, &mut ok)
        .expect("copy onto a link");
    assert_file(s, &p(b"lf2"), b"own", &own);
    r.symlink(&p(b"lf3"), &[&outside[..], b"/f"].concat(), &m)
        .expect("symlink lf3");
    r.hard_link(&p(b"own"), &p(b"lf3"))
        .expect("hard_link onto a link");
    assert_file(s, &p(b"lf3"), b"own", &own);
    r.rename(&p(b"l"), &p(b"moved"))
        .expect("rename the link itself");
    r.remove(&p(b"moved"), Kind::Symlink)
        .expect("remove the link itself");
    assert_eq!(
        s.outside_state(),
        before,
        "nothing outside the replica changed"
    );
    assert_names(s, b"", &[b"lf", b"lf2", b"lf3", b"own"]);
}

pub fn batch_writes_land_where_named(new: Factory) {
    let s = &*new();
    let r = s.replica();
    let m = meta(0o644, 4, 4);
    for d in [&b"a"[..], b"b", b"a/c"] {
        r.mkdir(&p(d)).expect("mkdir");
    }
    let files: [&[u8]; 6] = [b"a/1", b"a/2", b"b/1", b"a/c/1", b"a/3", b"top"];
    let mut written = Vec::new();
    r.batch(&mut || {
        for f in files {
            written.push(write(s, &p(f), f, &m));
        }
        written.push(r.copy_file(&p(b"a/1"), &p(b"b/2"), &m, &mut ok));
    });
    for (f, w) in files.iter().copied().chain([&b"b/2"[..]]).zip(&written) {
        let w = w
            .as_ref()
            .unwrap_or_else(|e| panic!("in a batch, {}: {e}", p(f)));
        let data: &[u8] = if f == b"b/2" { b"a/1" } else { f };
        assert_file(s, &p(f), data, &m);
        assert_written(s, &p(f), w, data);
    }
    assert_names(s, b"a", &[b"1", b"2", b"3", b"c"]);
    // A later batch after the directory was moved away writes to the new one of that name.
    r.rename(&p(b"a"), &p(b"old-a")).expect("rename");
    r.mkdir(&p(b"a")).expect("mkdir");
    r.batch(&mut || {
        must_write(s, b"a/4", b"4", &m);
    });
    assert_names(s, b"a", &[b"4"]);
    assert_names(s, b"old-a", &[b"1", b"2", b"3", b"c"]);
}

// ---------------------------------------------------------------------------------------------
// The read methods
// ---------------------------------------------------------------------------------------------

/// The tree the read checks look at: names that sort around '/', a nested directory, an empty
/// file, a larger one, and where the replica has symlinks one to a file beside it (`a/lx`) and
/// one to the directory outside (`out`). Returns its paths in canonical order, the root first.
fn plant(s: &dyn Subject) -> Vec<RelPath> {
    let r = s.replica();
    let m = meta(0o644, 1_600_000_000, 5);
    for d in [&b"a"[..], b"a/b", b"a-b"] {
        r.mkdir(&p(d))
            .unwrap_or_else(|e| panic!("mkdir {}: {e}", p(d)));
    }
    must_write(s, b"a/b/deep", b"deep", &m);
    must_write(s, b"a/x", b"x", &m);
    must_write(s, b"a-b/y", b"yy", &m);
    must_write(s, b"a.c", b"ccc", &m);
    must_write(s, b"empty", b"", &m);
    must_write(s, b"big", &big(200_000, 3), &m);
    let mut paths = vec![
        "a", "a-b", "a-b/y", "a.c", "a/b", "a/b/deep", "a/x", "big", "empty",
    ];
    if r.capabilities().symlinks {
        r.symlink(&p(b"a/lx"), b"x", &m).expect("symlink a/lx");
        r.symlink(&p(b"out"), &s.outside(), &m)
            .expect("symlink out");
        paths.insert(6, "a/lx");
        paths.push("out");
    }
    std::iter::once(RelPath::root())
        .chain(paths.into_iter().map(|path| p(path.as_bytes())))
        .collect()
}

pub fn walk_lists_every_node_in_canonical_order_stat_only(new: Factory) {
    let s = &*new();
    let want = plant(s);
    let outside = s.outside_state();
    let tree = super::walk_all(s.replica());
    let got: Vec<&RelPath> = tree.entries.iter().map(|(path, _)| path).collect();
    assert_eq!(
        got,
        want.iter().collect::<Vec<_>>(),
        "the walk lists every node once, in byte order of the whole path, the root first"
    );
    assert!(tree.problems.is_empty(), "no problem: {:?}", tree.problems);
    for (path, e) in &tree.entries {
        let n = seen(s, path);
        assert_eq!(e.kind(), n.kind, "{path}: kind");
        assert_eq!(e.fp, n.fp, "{path}: the stamp of the read-back");
        match &e.content {
            Content::File { size, hash } => {
                assert_eq!(*size, n.data.len() as u64, "{path}: size");
                assert!(
                    hash.is_none() || *size == 0,
                    "{path}: the walk stats, it does not read files"
                );
                assert_eq!(e.meta, n.meta, "{path}: meta as the read-back sees it");
            }
            Content::Symlink { target } => {
                assert_eq!(*target, n.data, "{path}: the symlink's own target");
            }
            Content::Dir { .. } => assert_eq!(e.meta, n.meta, "{path}: meta"),
            Content::Special => panic!("{path}: no special file was made"),
        }
    }
    assert_eq!(outside, s.outside_state(), "nothing outside was touched");
}

pub fn hash_equals_an_independent_read(new: Factory) {
    let s = &*new();
    let r = s.replica();
    plant(s);
    let mut tree = super::walk_all(r);
    // Changed between the walk and the hash: hashed as it is now. Gone: dropped.
    must_write(s, b"a/x", b"x again", &meta(0o644, 1_600_000_001, 0));
    r.remove(&p(b"a.c"), Kind::File).expect("remove a.c");
    let files: Vec<usize> = tree.unhashed().collect();
    let fresh = r.hash(&mut tree, &files);
    assert_eq!(fresh.len(), 4, "a/b/deep, a/x, a-b/y and big got a hash");
    assert!(tree.get(&p(b"a.c")).is_none(), "a file gone is dropped");
    for (path, e) in &tree.entries {
        let Content::File { size, hash: h } = e.content else {
            continue;
        };
        let n = seen(s, path);
        assert_eq!(h, Some(hash(&n.data)), "{path}: the hash of its bytes");
        assert_eq!(size, n.data.len() as u64, "{path}: size as it is now");
        assert_eq!(e.fp, n.fp, "{path}: the stamp as it is now");
    }
    for (path, e) in &fresh {
        assert_eq!(
            Some(e),
            tree.get(path),
            "{path}: returned as put in the tree"
        );
    }
}

pub fn open_reads_the_bytes_and_refuses_what_is_not_a_file(new: Factory) {
    let s = &*new();
    let r = s.replica();
    plant(s);
    let read = |path: &[u8]| -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        r.open(&p(path))?.read_to_end(&mut out)?;
        Ok(out)
    };
    assert_eq!(read(b"big").expect("open big"), big(200_000, 3));
    assert_eq!(read(b"a/b/deep").expect("open a/b/deep"), b"deep");
    assert_eq!(read(b"empty").expect("open empty"), b"");
    assert!(read(b"a").is_err(), "a directory is not opened");
    assert!(r.open(&RelPath::root()).is_err(), "the root is not opened");
    assert!(read(b"gone").is_err(), "a missing path");
    assert!(read(b"a/gone/f").is_err(), "a missing directory on the way");
    assert!(read(b"a/x/f").is_err(), "a file on the way");
    if r.capabilities().symlinks {
        let outside = s.outside_state();
        assert!(read(b"a/lx").is_err(), "a symlink is not followed");
        assert!(
            read(b"out/f").is_err(),
            "a symlink on the way is not followed"
        );
        assert_eq!(outside, s.outside_state(), "nothing outside was touched");
    }
}

pub fn identity_is_the_root_node_as_seen(new: Factory) {
    let s = &*new();
    let r = s.replica();
    assert_eq!(
        r.identity(),
        s.identity(),
        "the root as the read-back sees it"
    );
    if let Some(id) = r.identity() {
        let root = r.stat(&RelPath::root()).expect("stat the root");
        assert_eq!(
            root.node(),
            Some(id),
            "the root's stamp names the same node"
        );
    }
}
