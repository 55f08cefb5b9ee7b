//! Model tests of declared capabilities: random sequences of edits to a source tree, each
//! followed by a pass (walk, hash, diff, plan, apply) into a [`MemoryReplica`] in each
//! [`Profile`] (POSIX, SFTP-like, object-store-like), which refuses every operation its
//! profile lacks. After every pass the replica must mirror the source as the profile keeps
//! things (times to its precision, modes and owners only where kept, no symlinks or non-UTF-8
//! names where refused, hard links only where it has them), a second pass must plan nothing,
//! and an object-store plan must never stage, rename or hard-link.
//!
//! Budget: `DIRSYNC_MODEL_CASES=N` cases per profile (default [`DEFAULT_CASES`]).

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use common::*;
use dirsync::apply::{Recorder, apply};
use dirsync::diff::diff;
use dirsync::entry::{Content, Meta, RelPath};
use dirsync::hash::fill_tree_hashes;
use dirsync::oplog::OpLog;
use dirsync::plan::{Op as PlanOp, Plan, plan};
use dirsync::replica::Capabilities;
use dirsync::replica::Replica;
use dirsync::replica::caps::{MtimePrecision, Names, ServerCopy};
use dirsync::replica::memory::{MemoryReplica, Profile};
use dirsync::replica::probe::FsTraits;
use dirsync::scan::{self, Side};
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
// One pass, as `tests/model.rs` drives it
// ---------------------------------------------------------------------------------------------

/// Plans a pass from `src` into `mem`: both trees, hashes where sizes match, source entries as
/// the replica keeps them, diff, plan.
fn memory_plan(src: &Path, mem: &MemoryReplica) -> Plan {
    let caps = mem.capabilities();
    let mut tree = scan::walk(src, Side::Source);
    assert!(tree.problems.is_empty(), "scanning: {:?}", tree.problems);
    let mut dst = mem.tree();
    let sizes: HashSet<u64> = dst
        .iter()
        .filter_map(|(_, e)| match e.content {
            Content::File { size, .. } => Some(size),
            _ => None,
        })
        .collect();
    let need: Vec<usize> = tree
        .unhashed()
        .filter(|&i| sizes.contains(&tree.entries[i].1.size()))
        .collect();
    scan::hash_files(src, &mut tree, &need);
    let fs = caps.traits(FsTraits::default());
    for (_, e) in &mut tree.entries {
        caps.keep(e, &fs);
    }
    fill_tree_hashes(&mut tree.entries, caps.owners);
    fill_tree_hashes(&mut dst, caps.owners);
    let changes = diff(&tree.entries, &dst, caps.owners, &|p| tree.is_unknown(p));
    plan(&changes, &tree.entries, &dst, &caps)
}

/// Runs a pass (its first `stop_after` operations) and checks what the module doc says.
fn memory_sync(src: &Path, mem: &MemoryReplica, stop_after: Option<usize>) -> Result<(), String> {
    let caps = mem.capabilities();
    let mut plan = memory_plan(src, mem);
    check_ops(&plan, &caps)?;
    if let Some(n) = stop_after {
        plan.ops.truncate(n);
    }
    let fd = scan::open_dir(src).map_err(|e| format!("cannot open {}: {e}", src.display()))?;
    let source = dirsync::source::LocalSource::new(scan::Root {
        path: src,
        fd: std::os::fd::AsFd::as_fd(&fd),
    });
    let outcome = apply(
        &plan,
        mem,
        &source,
        &mut Recorder::new(None),
        &mut OpLog::default(),
        &AtomicBool::new(false),
    )
    .map_err(|e| format!("apply failed: {e}"))?;
    if !outcome.errors.is_empty() {
        return Err(format!(
            "the replica refused the plan: {:#?}\nplan: {:#?}",
            outcome.errors, plan.ops
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
    let again = memory_plan(src, mem);
    if !again.ops.is_empty() {
        return Err(format!(
            "a second pass still has work: {:#?}\nfirst plan: {:#?}",
            again.ops, plan.ops
        ));
    }
    Ok(())
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
    let mem = MemoryReplica::with_profile(profile, rustix::process::geteuid().is_root());
    let last = Step::Sync;
    for (i, step) in steps.iter().chain(std::iter::once(&last)).enumerate() {
        let result = match step {
            Step::Edit(e) => {
                edit(&fx.src, e);
                Ok(())
            }
            Step::Sync => memory_sync(&fx.src, &mem, None),
            Step::Kill(n) => memory_sync(&fx.src, &mem, Some(*n)),
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
    memory_sync(&fx.src, &sftp, None).unwrap();
    let nanos = Capabilities {
        mtime: MtimePrecision::Nanos,
        ..sftp.capabilities()
    };
    assert_ne!(expected(&fx.src, &nanos), held(&sftp, &nanos));

    std::os::unix::fs::symlink("f", fx.src.join("l")).unwrap();
    let object = MemoryReplica::with_profile(Profile::ObjectStoreLike, false);
    memory_sync(&fx.src, &object, None).unwrap();
    let plan = memory_plan(&fx.src, &object);
    assert!(plan.ops.is_empty(), "{:?}", plan.ops);
    assert_eq!(plan.unsupported.len(), 1, "{:?}", plan.unsupported);
    let posix = Capabilities::posix(false);
    assert_ne!(expected(&fx.src, &posix), held(&object, &posix));
}
