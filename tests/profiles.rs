//! Model tests of declared capabilities: random sequences of edits to a source tree, each
//! followed by the real pass (`engine::Engine` with an index in a temporary file, see
//! `tests/pass`) into a [`MemoryReplica`] in each [`Profile`] (POSIX, SFTP-like,
//! object-store-like), which refuses every operation its profile lacks and shows its backend's
//! stamps (POSIX, whole seconds, ETags). After every pass the replica must mirror the source as
//! the profile keeps things (times to its precision, modes and owners only where kept, no
//! symlinks or non-UTF-8 names where refused, hard links only where it has them), a second pass
//! must plan nothing, and a plan must never hold what the profile lacks (no stage, rename or
//! hard link on an object store, no copy on SFTP). After the final pass, whose source was left
//! alone past the racy window, a third pass reads no file (but whole-second stamps still
//! within their racy window).
//!
//! Budget: `DIRSYNC_MODEL_CASES=N` cases per profile (default [`DEFAULT_CASES`]).

mod common;
mod pass;

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use common::*;
use dirsync::entry::{Content, Entry, Kind, Meta, RACY_WINDOW_NS, RelPath, Stamp, Time};
use dirsync::error::ErrorKind;
use dirsync::plan::{Op as PlanOp, Plan};
use dirsync::replica::Capabilities;
use dirsync::replica::Replica;
use dirsync::replica::caps::{MtimePrecision, Names, ServerCopy};
use dirsync::replica::memory::{MemoryReplica, Profile};
use pass::{Pair, past_racy_window};
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, TestRunner};

const DEFAULT_CASES: u32 = 200;

fn cases() -> u32 {
    std::env::var("DIRSYNC_MODEL_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_CASES)
}

// ---------------------------------------------------------------------------------------------
// The edits (the style of `tests/model.rs`, with names that are not UTF-8)
// ---------------------------------------------------------------------------------------------

/// The paths edits pick from: names repeat at several depths, and two are not UTF-8.
const SLOTS: [&[u8]; 12] = [
    b"a", b"b", b"d", b"d/a", b"d/b", b"d/e", b"d/e/a", b"e", b"e/a", b"\xff", b"\xff/a", b"d/\xfe",
];

fn content(id: usize) -> Vec<u8> {
    match id % 6 {
        0 => Vec::new(),
        1 => b"x".to_vec(),
        2 => b"y".to_vec(),
        3 => b"hello world\n".to_vec(),
        4 => bytes(4, 3000),
        _ => bytes(5, 70_000),
    }
}

const MODES: [u32; 4] = [0o644, 0o600, 0o755, 0o640];
/// Times with and without nanoseconds, so a whole-second replica meets both.
const MTIMES: [(i64, u32); 4] = [
    (1_500_000_000, 0),
    (1_500_000_000, 1),
    (1_600_000_000, 999_999_999),
    (946_684_800, 123_456_789),
];

#[derive(Clone, Debug)]
enum Edit {
    Create(usize, usize),
    Delete(usize),
    /// Renames a file, symlink or directory (creating the target's parents).
    Rename(usize, usize),
    /// Copies a file with its mode and mtime (an exact duplicate).
    Copy(usize, usize),
    Chmod(usize, usize),
    Touch(usize, usize),
    Symlink(usize),
    Mkdir(usize),
    HardLink(usize, usize),
}

#[derive(Clone, Debug)]
enum Step {
    Edit(Edit),
    Sync,
    /// A pass that stops after this many operations.
    Kill(usize),
}

fn steps_strategy() -> impl Strategy<Value = Vec<Step>> {
    let s = 0..SLOTS.len();
    let edit = prop_oneof![
        6 => (s.clone(), 0..6usize).prop_map(|(p, c)| Edit::Create(p, c)),
        2 => s.clone().prop_map(Edit::Delete),
        4 => (s.clone(), s.clone()).prop_map(|(a, b)| Edit::Rename(a, b)),
        2 => (s.clone(), s.clone()).prop_map(|(a, b)| Edit::Copy(a, b)),
        1 => (s.clone(), 0..MODES.len()).prop_map(|(p, m)| Edit::Chmod(p, m)),
        2 => (s.clone(), 0..MTIMES.len()).prop_map(|(p, t)| Edit::Touch(p, t)),
        1 => s.clone().prop_map(Edit::Symlink),
        2 => s.clone().prop_map(Edit::Mkdir),
        1 => (s.clone(), s).prop_map(|(a, b)| Edit::HardLink(a, b)),
    ];
    let step = prop_oneof![
        12 => edit.prop_map(Step::Edit),
        3 => Just(Step::Sync),
        1 => (1..8usize).prop_map(Step::Kill),
    ];
    prop::collection::vec(step, 1..40)
}

/// Applies one edit to the source; edits that make no sense for the current tree do nothing.
fn edit(src: &Path, e: &Edit) {
    let path = |i: usize| -> PathBuf { src.join(OsStr::from_bytes(SLOTS[i])) };
    let parents = |p: &Path| {
        let _ = fs::create_dir_all(p.parent().expect("below the root"));
    };
    let md = |p: &Path| fs::symlink_metadata(p).ok();
    let is_file = |p: &Path| md(p).is_some_and(|m| m.file_type().is_file());
    let is_dir = |p: &Path| md(p).is_some_and(|m| m.file_type().is_dir());
    let _ = match e {
        Edit::Create(p, c) => {
            let p = path(*p);
            parents(&p);
            if is_dir(&p) {
                return;
            }
            let _ = fs::remove_file(&p);
            fs::write(&p, content(*c))
        }
        Edit::Delete(p) => {
            let p = path(*p);
            match is_dir(&p) {
                true => fs::remove_dir_all(&p),
                false => fs::remove_file(&p),
            }
        }
        Edit::Rename(a, b) => {
            parents(&path(*b));
            fs::rename(path(*a), path(*b))
        }
        Edit::Copy(a, b) => {
            let (a, b) = (path(*a), path(*b));
            if !is_file(&a) || is_dir(&b) || a == b {
                return;
            }
            parents(&b);
            let _ = fs::remove_file(&b);
            fs::copy(&a, &b).and_then(|_| {
                let t = filetime::FileTime::from_last_modification_time(&fs::metadata(&a)?);
                filetime::set_file_mtime(&b, t)
            })
        }
        Edit::Chmod(p, m) => {
            let p = path(*p);
            if !is_file(&p) {
                return;
            }
            fs::set_permissions(&p, fs::Permissions::from_mode(MODES[*m]))
        }
        Edit::Touch(p, t) => {
            let (s, n) = MTIMES[*t];
            let ft = filetime::FileTime::from_unix_time(s, n);
            filetime::set_symlink_file_times(path(*p), ft, ft)
        }
        Edit::Symlink(p) => {
            let p = path(*p);
            parents(&p);
            if md(&p).is_some() {
                return;
            }
            std::os::unix::fs::symlink("a", &p)
        }
        Edit::Mkdir(p) => fs::create_dir_all(path(*p)),
        Edit::HardLink(a, b) => {
            let (a, b) = (path(*a), path(*b));
            if !is_file(&a) || is_dir(&b) || a == b {
                return;
            }
            parents(&b);
            let _ = fs::remove_file(&b);
            fs::hard_link(&a, &b)
        }
    };
}

// ---------------------------------------------------------------------------------------------
// One real pass, as `tests/model.rs` drives it
// ---------------------------------------------------------------------------------------------

/// A real pass of `pair` into `mem` (stopped after `stop_after` operations) that plans only
/// what the profile can do and fails at no path (a source node the replica cannot hold is
/// reported as unsupported, and nothing else); after a whole pass, what the module doc says.
/// With `settled` (the source was left alone past the racy window before this pass) a third
/// pass reads no file, but one whose whole-second stamp is still racy.
fn memory_sync(
    pair: &Pair,
    src: &Path,
    mem: &MemoryReplica,
    stop_after: Option<usize>,
    settled: bool,
) -> Result<(), String> {
    let caps = mem.capabilities();
    let started = Time::now();
    let report = pair.sync(mem, stop_after.map(|n| n as u64))?;
    let plan = &report.plan;
    check_ops(plan, &caps)?;
    let refused = report
        .scan_errors
        .iter()
        .filter(|e| e.kind != ErrorKind::Unsupported);
    if !report.outcome.errors.is_empty() || refused.count() > 0 {
        return Err(format!(
            "the replica refused the plan: {:#?} {:#?}\nplan: {:#?}",
            report.outcome.errors, report.scan_errors, plan.ops
        ));
    }
    if stop_after.is_some() {
        return Ok(());
    }
    let (want, got) = (expected(src, &caps), held(mem, &caps));
    if want != got {
        return Err(format!(
            "the replica is not a mirror of the source as it keeps it:\n  {}\nplan: {:#?}",
            differences(&want, &got).join("\n  "),
            plan.ops
        ));
    }
    let again = pair.sync(mem, None)?;
    if !again.plan.ops.is_empty() || !again.plan.items.is_empty() {
        return Err(format!(
            "a second pass still has work: {:#?}\nfirst plan: {:#?}",
            again.plan.ops, plan.ops
        ));
    }
    if !settled {
        return Ok(());
    }
    // The second pass may read what no pass had a reason to read before (a file whose size the
    // replica had only after the first); the records it made are past the racy window.
    let idle = pair.sync(mem, None)?;
    let racy = racy_files(mem, started);
    if !idle.plan.ops.is_empty() || idle.files_hashed > racy {
        return Err(format!(
            "a third pass after the racy window read {} files again ({racy} racy): {:#?}\nfirst plan: {:#?}",
            idle.files_hashed, idle.plan.ops, plan.ops
        ));
    }
    Ok(())
}

/// How many replica files a pass that began at `started` may have recorded as racily clean:
/// those with a whole-second stamp changed within the wide racy window before it (a seconds
/// stamp has no ctime; a same-second change could leave it as it was). A POSIX memory stamp
/// is racy for 20 ms only, an object stamp never.
fn racy_files(mem: &MemoryReplica, started: Time) -> u64 {
    let racy = |e: &Entry| {
        matches!(e.fp, Stamp::Seconds { .. })
            && e.fp.changed_ns().unwrap() + RACY_WINDOW_NS > started.as_nanos()
    };
    let files = mem
        .tree()
        .into_iter()
        .filter(|(_, e)| e.kind() == Kind::File);
    files.filter(|(_, e)| racy(e)).count() as u64
}

/// Operations the profile lacks are never planned (the apply loop would fall back from a
/// refused copy to a write from the source, and hide it).
fn check_ops(plan: &Plan, caps: &Capabilities) -> Result<(), String> {
    let no_rename = caps.rename == dirsync::replica::caps::Rename::None;
    for op in &plan.ops {
        let bad = match op {
            PlanOp::Stage { .. } | PlanOp::Rename { .. } => no_rename,
            PlanOp::Copy { .. } => caps.server_copy == ServerCopy::None,
            PlanOp::Link { .. } => !caps.hard_links,
            PlanOp::Symlink { .. } => !caps.symlinks,
            _ => false,
        };
        if bad {
            return Err(format!("planned {op:?} on {caps:?}"));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Both sides as the profile keeps them
// ---------------------------------------------------------------------------------------------

/// One node as a replica with some capabilities keeps it: kind letter, content hash, symlink
/// target, mode (not for symlinks), mtime, owners (where kept), hard-link leader (where kept).
type Kept = (
    char,
    Option<[u8; 32]>,
    Option<Vec<u8>>,
    Option<u32>,
    i128,
    Option<(u32, u32)>,
    Option<Vec<u8>>,
);

/// The source, read with `std::fs`, as a replica with `caps` holds it: what it refuses left
/// out, metadata as [`Capabilities::keep_meta`] says, hard links only where it has them.
fn expected(src: &Path, caps: &Capabilities) -> BTreeMap<Vec<u8>, Kept> {
    let mut out = BTreeMap::new();
    let mut leaders: HashMap<(u64, u64), Vec<u8>> = HashMap::new();
    let mut todo = vec![Vec::new()];
    let mut found = Vec::new();
    while let Some(rel) = todo.pop() {
        let full = match rel.is_empty() {
            true => src.to_path_buf(),
            false => src.join(OsStr::from_bytes(&rel)),
        };
        let md = fs::symlink_metadata(&full).unwrap();
        found.push((rel.clone(), full.clone(), md.clone()));
        if md.is_dir() {
            for entry in fs::read_dir(&full).unwrap() {
                let name = entry.unwrap().file_name();
                let mut child = rel.clone();
                if !child.is_empty() {
                    child.push(b'/');
                }
                child.extend_from_slice(name.as_bytes());
                todo.push(child);
            }
        }
    }
    found.sort_by(|a, b| a.0.cmp(&b.0));
    for (rel, full, md) in found {
        let ft = md.file_type();
        let refused_name = caps.names == Names::Utf8 && std::str::from_utf8(&rel).is_err();
        if refused_name || (ft.is_symlink() && !caps.symlinks) {
            continue;
        }
        let (kind, hash, target) = if ft.is_dir() {
            ('d', None, None)
        } else if ft.is_symlink() {
            let t = fs::read_link(&full)
                .unwrap()
                .as_os_str()
                .as_bytes()
                .to_vec();
            ('l', None, Some(t))
        } else {
            let h = *blake3::hash(&fs::read(&full).unwrap()).as_bytes();
            ('f', Some(h), None)
        };
        let entry_kind = match kind {
            'd' => dirsync::entry::Kind::Dir,
            'l' => dirsync::entry::Kind::Symlink,
            _ => dirsync::entry::Kind::File,
        };
        let meta = caps.keep_meta(entry_kind, Meta::of_metadata(&md));
        let leader = (kind == 'f' && md.nlink() > 1 && caps.hard_links)
            .then(|| {
                let first = leaders.entry((md.dev(), md.ino())).or_insert(rel.clone());
                (*first != rel).then(|| first.clone())
            })
            .flatten();
        out.insert(rel, kept(kind, hash, target, &meta, caps, leader));
    }
    out
}

fn kept(
    kind: char,
    hash: Option<[u8; 32]>,
    target: Option<Vec<u8>>,
    meta: &Meta,
    caps: &Capabilities,
    leader: Option<Vec<u8>>,
) -> Kept {
    let mode = (kind != 'l').then_some(meta.mode);
    let owners = caps.owners.then_some((meta.uid, meta.gid));
    (
        kind,
        hash,
        target,
        mode,
        meta.mtime.as_nanos(),
        owners,
        leader,
    )
}

/// The memory replica's tree in the same form.
fn held(mem: &MemoryReplica, caps: &Capabilities) -> BTreeMap<Vec<u8>, Kept> {
    mem.tree()
        .into_iter()
        .map(|(p, e)| {
            let (kind, hash, target) = match &e.content {
                Content::File { hash, .. } => ('f', *hash, None),
                Content::Dir { .. } => ('d', None, None),
                Content::Symlink { target } => ('l', None, Some(target.clone())),
                Content::Special => ('s', None, None),
            };
            let leader = e.link.map(|l: RelPath| l.as_bytes().to_vec());
            let k = kept(kind, hash, target, &e.meta, caps, leader);
            (p.as_bytes().to_vec(), k)
        })
        .collect()
}

fn differences(want: &BTreeMap<Vec<u8>, Kept>, got: &BTreeMap<Vec<u8>, Kept>) -> Vec<String> {
    let keys: std::collections::BTreeSet<&Vec<u8>> = want.keys().chain(got.keys()).collect();
    keys.into_iter()
        .filter(|k| want.get(*k) != got.get(*k))
        .map(|k| {
            format!(
                "{}: source {:?}, replica {:?}",
                String::from_utf8_lossy(k),
                want.get(k),
                got.get(k)
            )
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The tests
// ---------------------------------------------------------------------------------------------

fn run_case(profile: Profile, steps: &[Step]) -> Result<(), TestCaseError> {
    let fx = Fixture::default();
    let owners = rustix::process::geteuid().is_root();
    let mem = MemoryReplica::with_profile(profile, owners);
    let pair = Pair::new(&fx.src, owners);
    let last = Step::Sync;
    for (i, step) in steps.iter().chain(std::iter::once(&last)).enumerate() {
        let settled = i == steps.len();
        let result = match step {
            Step::Edit(e) => {
                edit(&fx.src, e);
                Ok(())
            }
            Step::Sync => {
                if settled {
                    past_racy_window();
                }
                memory_sync(&pair, &fx.src, &mem, None, settled)
            }
            Step::Kill(n) => memory_sync(&pair, &fx.src, &mem, Some(*n), false),
        };
        result
            .map_err(|e| TestCaseError::fail(format!("{profile:?}, step {i} ({step:?}): {e}")))?;
    }
    Ok(())
}

fn run_profile(profile: Profile) {
    let mut runner = TestRunner::new(ProptestConfig {
        cases: cases(),
        max_shrink_iters: 400,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    let started = std::time::Instant::now();
    let result = runner.run(&steps_strategy(), |steps| run_case(profile, &steps));
    eprintln!(
        "profiles ({profile:?}): {} cases in {:.1}s",
        cases(),
        started.elapsed().as_secs_f64()
    );
    if let Err(e) = result {
        panic!("{e}");
    }
}

#[test]
fn posix_memory_replica_mirrors_the_source_after_every_pass() {
    run_profile(Profile::Posix);
}

#[test]
fn sftp_like_memory_replica_mirrors_the_source_as_it_keeps_it() {
    run_profile(Profile::SftpLike);
}

#[test]
fn object_store_like_memory_replica_mirrors_the_source_without_rename() {
    run_profile(Profile::ObjectStoreLike);
}

/// The comparison can fail: a whole-second replica compared at nanosecond precision, and an
/// object store with a symlink it cannot hold, are told apart from the source.
#[test]
fn profile_comparison_catches_what_the_replica_does_not_keep() {
    let fx = Fixture::default();
    write(&fx.src.join("f"), b"x");
    let t = filetime::FileTime::from_unix_time(1_500_000_000, 5);
    filetime::set_file_mtime(fx.src.join("f"), t).unwrap();
    let sftp = MemoryReplica::with_profile(Profile::SftpLike, false);
    let pair = Pair::new(&fx.src, false);
    memory_sync(&pair, &fx.src, &sftp, None, false).unwrap();
    let nanos = Capabilities {
        mtime: MtimePrecision::Nanos,
        ..sftp.capabilities()
    };
    assert_ne!(expected(&fx.src, &nanos), held(&sftp, &nanos));

    std::os::unix::fs::symlink("f", fx.src.join("l")).unwrap();
    let object = MemoryReplica::with_profile(Profile::ObjectStoreLike, false);
    let pair = Pair::new(&fx.src, false);
    memory_sync(&pair, &fx.src, &object, None, false).unwrap();
    let again = pair.sync(&object, None).unwrap();
    assert!(again.plan.ops.is_empty(), "{:?}", again.plan.ops);
    assert_eq!(
        again.plan.unsupported.len(),
        1,
        "{:?}",
        again.plan.unsupported
    );
    let posix = Capabilities::posix(false);
    assert_ne!(expected(&fx.src, &posix), held(&object, &posix));
}

/// A whole-second stamp has no ctime: bytes changed by someone else within the same second as
/// the mtime dirsync set leave it as it was. The record of a file the pass wrote is therefore
/// racy until the stamp's second is well past, and the next pass reads the file and puts it
/// right; once the window passed, passes settle and read nothing.
#[test]
fn a_seconds_replica_misses_no_same_second_change_and_settles_after_its_window() {
    let fx = Fixture::default();
    write(&fx.src.join("f"), b"one");
    let sftp = MemoryReplica::with_profile(Profile::SftpLike, false);
    let pair = Pair::new(&fx.src, false);
    let first = pair.sync(&sftp, None).unwrap();
    assert_eq!(first.outcome.done.total(), 1, "{:#?}", first.plan.ops);
    let f = RelPath::from_bytes(b"f").unwrap();
    let before = sftp.stat(&f).unwrap();
    assert!(matches!(before, Stamp::Seconds { .. }), "{before:?}");
    // Same size, same second: the stamp cannot tell.
    let meta = Meta::of_metadata(&fs::symlink_metadata(fx.src.join("f")).unwrap());
    sftp.write_file(&f, &mut &b"two"[..], &meta, &mut |_, _| Ok(()))
        .unwrap();
    assert_eq!(sftp.stat(&f).unwrap(), before, "the change keeps the stamp");
    past_racy_window();
    let second = pair.sync(&sftp, None).unwrap();
    assert_eq!(
        sftp.read(&f).unwrap(),
        b"one",
        "the same-second change was missed: {:#?}",
        second.plan.ops
    );
    std::thread::sleep(std::time::Duration::from_nanos(
        RACY_WINDOW_NS as u64 + 100_000_000,
    ));
    let third = pair.sync(&sftp, None).unwrap();
    assert!(third.plan.ops.is_empty(), "{:#?}", third.plan.ops);
    let idle = pair.sync(&sftp, None).unwrap();
    assert!(idle.plan.ops.is_empty(), "{:#?}", idle.plan.ops);
    assert_eq!(idle.files_hashed, 0, "passes settle once the window passed");
}

/// Linking changes the shared inode's ctime: a pass that makes a hard link records the
/// leader's new stamp too, so the next pass (after the racy window) reads no file, on a memory
/// replica and on a local directory.
#[test]
fn a_hard_link_made_by_the_pass_leaves_no_record_stale() {
    let fx = Fixture::default();
    mkdir(&fx.src.join("a"));
    write(&fx.src.join("a/x"), b"linked");
    fs::hard_link(fx.src.join("a/x"), fx.src.join("a/x2")).unwrap();
    set_mtime(&fx.src.join("a/x"), 1_600_000_000, 7);
    set_mtime(&fx.src.join("a"), 1_500_000_000, 5);
    past_racy_window();
    let mem = MemoryReplica::new(false);
    let held = dirsync::replica::root::ReplicaRoot::create(&fx.dst).unwrap();
    let local = dirsync::replica::local::LocalReplica::held(&held, false).unwrap();
    let replicas: [(&str, &dyn Replica); 2] = [("memory", &mem), ("local", &local)];
    for (name, replica) in replicas {
        let pair = Pair::new(&fx.src, false);
        let first = pair.sync(replica, None).unwrap();
        let linked = first
            .plan
            .ops
            .iter()
            .any(|op| matches!(op, PlanOp::Link { .. }));
        assert!(linked, "{name}: {:#?}", first.plan.ops);
        past_racy_window();
        let second = pair.sync(replica, None).unwrap();
        assert!(second.plan.ops.is_empty(), "{name}: {:#?}", second.plan.ops);
        assert_eq!(
            second.files_hashed, 0,
            "{name}: the pass after the link read files"
        );
    }
}
