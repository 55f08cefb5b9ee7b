//! Model-based tests: random sequences of edits to a source tree, interleaved with syncs and
//! crashes, replicated twice: by the `dirsync` binary into a real directory, and by the library's
//! real pass (`engine::Engine` with an index in a temporary file: merge, index cursors, inode
//! reuse, copy-source lookup, plan, apply) into a [`MemoryReplica`] that enforces filesystem
//! rules; a crash of the in-memory pass is the pass stopped by its stop flag. After every
//! completed sync both replicas must mirror the source exactly, and a second pass must find
//! nothing to do; after the final sync, whose source was left alone past the racy window, a
//! third pass must read no file either.
//!
//! Budget: `DIRSYNC_MODEL_CASES=N` sets the number of cases (default [`DEFAULT_CASES`] for the
//! binary, four times as many for the in-memory-only test).

mod common;
mod pass;

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};

use common::*;
use dirsync::entry::{Content, Entry, Meta, RelPath};
use dirsync::replica::memory::MemoryReplica;
use pass::{Pair, past_racy_window};
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, TestRunner};

const DEFAULT_CASES: u32 = 100;

fn cases(scale: u32) -> u32 {
    std::env::var("DIRSYNC_MODEL_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_CASES)
        .saturating_mul(scale)
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

// ---------------------------------------------------------------------------------------------
// The operations
// ---------------------------------------------------------------------------------------------

/// The paths operations pick from. Names repeat at several depths, so that files, directories
/// and symlinks keep trading places.
const SLOTS: [&str; 14] = [
    "a", "b", "c", "d", "d/a", "d/b", "d/e", "d/e/a", "d/e/b", "e", "e/a", "e/d", "e/d/a", "f",
];

/// File contents: some of equal size with different bytes, one larger than the copy buffer.
fn content(id: usize) -> Vec<u8> {
    match id % 8 {
        0 => Vec::new(),
        1 => b"x".to_vec(),
        2 => b"y".to_vec(),
        3 => b"hello world\n".to_vec(),
        4 => bytes(4, 3000),
        5 => bytes(5, 3000),
        6 => bytes(6, 300_000),
        _ => b"hello world?".to_vec(),
    }
}

const FILE_MODES: [u32; 7] = [0o644, 0o600, 0o755, 0o444, 0o4755, 0o2750, 0o000];
const DIR_MODES: [u32; 5] = [0o755, 0o700, 0o555, 0o1777, 0o2755];
const TARGETS: [&str; 6] = ["a", "../b", "/etc/passwd", "d/e", "missing", "."];
const MTIMES: [(i64, u32); 4] = [
    (1_500_000_000, 0),
    (1_500_000_000, 1),
    (1_600_000_000, 999_999_999),
    (946_684_800, 123_456_789),
];

#[derive(Clone, Copy, Debug)]
enum NodeKind {
    File,
    Dir,
    Symlink,
}

#[derive(Clone, Debug)]
enum Op {
    /// Writes a file (creating parents), unless a directory is there.
    Create(usize, usize),
    /// Rewrites an existing file.
    Modify(usize, usize),
    Append(usize, usize),
    Truncate(usize, usize),
    Delete(usize),
    /// Renames a file, symlink or directory (creating the target's parents).
    Rename(usize, usize),
    Swap(usize, usize),
    /// Copies a file; with `true` its mode and mtime too (an exact duplicate).
    Copy(usize, usize, bool),
    Chmod(usize, usize),
    Touch(usize, usize),
    Symlink(usize, usize),
    RemoveSymlink(usize),
    Mkdir(usize),
    Rmdir(usize),
    ChangeType(usize, NodeKind),
    HardLink(usize, usize),
    /// Same size, same mtime, new bytes: only the ctime changes.
    SneakyEdit(usize),
}

#[derive(Clone, Debug)]
enum Step {
    Edit(Op),
    Sync,
    /// A sync killed after this many applied operations.
    Kill(u64),
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let s = 0..SLOTS.len();
    let kind = prop_oneof![
        Just(NodeKind::File),
        Just(NodeKind::Dir),
        Just(NodeKind::Symlink)
    ];
    prop_oneof![
        6 => (s.clone(), 0..8usize).prop_map(|(p, c)| Op::Create(p, c)),
        3 => (s.clone(), 0..8usize).prop_map(|(p, c)| Op::Modify(p, c)),
        1 => (s.clone(), 0..8usize).prop_map(|(p, c)| Op::Append(p, c)),
        1 => (s.clone(), 0..4usize).prop_map(|(p, l)| Op::Truncate(p, l)),
        2 => s.clone().prop_map(Op::Delete),
        3 => (s.clone(), s.clone()).prop_map(|(a, b)| Op::Rename(a, b)),
        1 => (s.clone(), s.clone()).prop_map(|(a, b)| Op::Swap(a, b)),
        2 => (s.clone(), s.clone(), any::<bool>()).prop_map(|(a, b, m)| Op::Copy(a, b, m)),
        1 => (s.clone(), 0..7usize).prop_map(|(p, m)| Op::Chmod(p, m)),
        1 => (s.clone(), 0..MTIMES.len()).prop_map(|(p, t)| Op::Touch(p, t)),
        1 => (s.clone(), 0..TARGETS.len()).prop_map(|(p, t)| Op::Symlink(p, t)),
        1 => s.clone().prop_map(Op::RemoveSymlink),
        2 => s.clone().prop_map(Op::Mkdir),
        1 => s.clone().prop_map(Op::Rmdir),
        2 => (s.clone(), kind).prop_map(|(p, k)| Op::ChangeType(p, k)),
        1 => (s.clone(), s.clone()).prop_map(|(a, b)| Op::HardLink(a, b)),
        1 => s.prop_map(Op::SneakyEdit),
    ]
}

fn steps_strategy(max_len: usize) -> impl Strategy<Value = Vec<Step>> {
    let step = prop_oneof![
        14 => op_strategy().prop_map(Step::Edit),
        3 => Just(Step::Sync),
        // Plans are short and begin with staging moves: most kills land early.
        1 => prop_oneof![3 => 1..6u64, 1 => 6..40u64].prop_map(Step::Kill),
    ];
    prop::collection::vec(step, 1..max_len)
}

/// Applies one edit to the source; edits that make no sense for the current tree do nothing.
fn edit(src: &Path, op: &Op) {
    let path = |i: usize| -> PathBuf { src.join(SLOTS[i]) };
    let parents = |p: &Path| {
        let _ = fs::create_dir_all(p.parent().expect("below the root"));
    };
    let md = |p: &Path| fs::symlink_metadata(p).ok();
    let is_file = |p: &Path| md(p).is_some_and(|m| m.file_type().is_file());
    let is_dir = |p: &Path| md(p).is_some_and(|m| m.file_type().is_dir());
    let is_link = |p: &Path| md(p).is_some_and(|m| m.file_type().is_symlink());
    let remove_any = |p: &Path| {
        let _ = if is_dir(p) {
            fs::remove_dir_all(p)
        } else {
            fs::remove_file(p)
        };
    };
    let _ = match op {
        Op::Create(p, c) => {
            let p = path(*p);
            parents(&p);
            if is_dir(&p) {
                return;
            }
            if is_link(&p) {
                let _ = fs::remove_file(&p);
            }
            fs::write(&p, content(*c))
        }
        Op::Modify(p, c) => {
            let p = path(*p);
            if !is_file(&p) {
                return;
            }
            fs::write(&p, content(*c))
        }
        Op::Append(p, c) => {
            let p = path(*p);
            if !is_file(&p) {
                return;
            }
            fs::OpenOptions::new()
                .append(true)
                .open(&p)
                .and_then(|mut f| f.write_all(&content(*c)))
        }
        Op::Truncate(p, l) => {
            let p = path(*p);
            if !is_file(&p) {
                return;
            }
            fs::OpenOptions::new()
                .write(true)
                .open(&p)
                .and_then(|f| f.set_len([0, 1, 100, 2999][*l]))
        }
        Op::Delete(p) => {
            remove_any(&path(*p));
            Ok(())
        }
        Op::Rename(a, b) => {
            parents(&path(*b));
            fs::rename(path(*a), path(*b))
        }
        Op::Swap(a, b) => {
            let (a, b) = (path(*a), path(*b));
            if md(&a).is_none() || md(&b).is_none() || a == b {
                return;
            }
            let tmp = src.join("swap.tmp");
            remove_any(&tmp);
            fs::rename(&a, &tmp)
                .and_then(|_| fs::rename(&b, &a))
                .and_then(|_| fs::rename(&tmp, &b))
        }
        Op::Copy(a, b, exact) => {
            let (a, b) = (path(*a), path(*b));
            if !is_file(&a) || is_dir(&b) || a == b {
                return;
            }
            parents(&b);
            if is_link(&b) {
                let _ = fs::remove_file(&b);
            }
            // A fresh inode: a hard-linked target must not be written through.
            let _ = fs::remove_file(&b);
            fs::copy(&a, &b).and_then(|_| {
                if *exact {
                    let m = fs::metadata(&a)?;
                    let t = filetime::FileTime::from_last_modification_time(&m);
                    filetime::set_file_mtime(&b, t)
                } else {
                    Ok(())
                }
            })
        }
        Op::Chmod(p, m) => {
            let p = path(*p);
            if is_link(&p) || md(&p).is_none() {
                return;
            }
            let mode = if is_dir(&p) {
                let mode = DIR_MODES[*m % DIR_MODES.len()];
                if is_root() { mode } else { mode | 0o700 }
            } else {
                let mode = FILE_MODES[*m];
                if is_root() { mode } else { mode | 0o600 }
            };
            fs::set_permissions(&p, fs::Permissions::from_mode(mode))
        }
        Op::Touch(p, t) => {
            let (s, n) = MTIMES[*t];
            let ft = filetime::FileTime::from_unix_time(s, n);
            filetime::set_symlink_file_times(path(*p), ft, ft)
        }
        Op::Symlink(p, t) => {
            let p = path(*p);
            parents(&p);
            if md(&p).is_some() {
                return;
            }
            std::os::unix::fs::symlink(TARGETS[*t], &p)
        }
        Op::RemoveSymlink(p) => {
            let p = path(*p);
            if !is_link(&p) {
                return;
            }
            fs::remove_file(&p)
        }
        Op::Mkdir(p) => fs::create_dir_all(path(*p)),
        Op::Rmdir(p) => fs::remove_dir(path(*p)),
        Op::ChangeType(p, k) => {
            let p = path(*p);
            remove_any(&p);
            parents(&p);
            match k {
                NodeKind::File => fs::write(&p, content(3)),
                NodeKind::Dir => fs::create_dir(&p),
                NodeKind::Symlink => std::os::unix::fs::symlink("a", &p),
            }
        }
        Op::HardLink(a, b) => {
            let (a, b) = (path(*a), path(*b));
            if !is_file(&a) || is_dir(&b) || a == b {
                return;
            }
            parents(&b);
            let _ = fs::remove_file(&b);
            fs::hard_link(&a, &b)
        }
        Op::SneakyEdit(p) => {
            let p = path(*p);
            let Some(m) = md(&p).filter(|m| m.file_type().is_file() && m.len() > 0) else {
                return;
            };
            let Ok(mut data) = fs::read(&p) else { return };
            for b in &mut data {
                *b = b.wrapping_add(1);
            }
            fs::write(&p, &data).and_then(|_| {
                filetime::set_file_times(
                    &p,
                    filetime::FileTime::from_last_access_time(&m),
                    filetime::FileTime::from_last_modification_time(&m),
                )
            })
        }
    };
}

// ---------------------------------------------------------------------------------------------
// The two replicas
// ---------------------------------------------------------------------------------------------

/// Runs the binary's `sync`; returns an error message instead of panicking, for proptest.
fn binary_sync(fx: &Fixture) -> Result<(), String> {
    let out = fx
        .std_cmd()
        .arg("sync")
        .arg(&fx.src)
        .arg(&fx.dst)
        // The model may delete everything; the guard rail for that is tested elsewhere.
        .arg("--allow-empty-source")
        .output()
        .expect("run dirsync");
    if out.status.code() != Some(0) {
        return Err(format!(
            "sync exited with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let diffs = mirror_diff(&snapshot(&fx.src), &snapshot(&fx.dst));
    if !diffs.is_empty() {
        return Err(format!(
            "after sync, DST is not a mirror of SRC:\n  {}",
            diffs.join("\n  ")
        ));
    }
    let st = fx
        .std_cmd()
        .arg("status")
        .arg(&fx.src)
        .arg(&fx.dst)
        .output()
        .expect("run dirsync");
    if st.status.code() != Some(0) || !st.stdout.is_empty() {
        return Err(format!(
            "status right after a sync is not empty ({}):\n{}{}",
            st.status,
            String::from_utf8_lossy(&st.stdout),
            String::from_utf8_lossy(&st.stderr)
        ));
    }
    Ok(())
}

/// Runs `sync` with the fault hook; it must die by SIGKILL, or finish (exit 0) when the plan
/// had fewer operations.
fn binary_kill(fx: &Fixture, n: u64) -> Result<(), String> {
    let out = fx
        .std_cmd()
        .env("DIRSYNC_FAULT_KILL_AFTER", n.to_string())
        .arg("sync")
        .arg(&fx.src)
        .arg(&fx.dst)
        .arg("--allow-empty-source")
        .output()
        .expect("run dirsync");
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.signal() == Some(9) || out.status.code() == Some(0) {
        Ok(())
    } else {
        Err(format!(
            "sync with DIRSYNC_FAULT_KILL_AFTER={n} ended with {}: {stderr}",
            out.status
        ))
    }
}

/// One real pass of `pair` into `mem` (its first `kill_after` operations, then stopped): no
/// path may fail. After a whole pass the replica mirrors the source and a second pass plans
/// nothing; with `settled` (the source was left alone for longer than the racy window before
/// this pass) a third pass reads no file either.
fn memory_sync(
    pair: &Pair,
    src: &Path,
    mem: &MemoryReplica,
    kill_after: Option<u64>,
    settled: bool,
) -> Result<(), String> {
    let before = mem.tree();
    let report = pair.sync(mem, kill_after)?;
    let plan = &report.plan;
    if !report.outcome.errors.is_empty() || !report.scan_errors.is_empty() {
        return Err(format!(
            "the pass into the memory replica failed: {:#?} {:#?}\nreplica before: {:#?}\nplan: {:#?}",
            report.outcome.errors,
            report.scan_errors,
            brief(&before),
            plan.ops
        ));
    }
    if kill_after.is_some() {
        return Ok(());
    }
    let diffs = memory_diff(src, mem);
    if !diffs.is_empty() {
        return Err(format!(
            "after sync, the memory replica is not a mirror of SRC:\n  {}\nreplica before: {:#?}\nplan: {:#?}",
            diffs.join("\n  "),
            brief(&before),
            plan.ops
        ));
    }
    let again = pair.sync(mem, None)?;
    if !again.plan.ops.is_empty() || !again.plan.items.is_empty() {
        return Err(format!(
            "a second pass over the memory replica still has work: {:#?}\nfirst plan: {:#?}",
            again.plan.ops, plan.ops
        ));
    }
    if !settled {
        return Ok(());
    }
    // The second pass may read what no pass had a reason to read before (a file whose size the
    // replica had only after the first); the records it made are past the racy window.
    let idle = pair.sync(mem, None)?;
    if !idle.plan.ops.is_empty() || idle.files_hashed != 0 {
        return Err(format!(
            "a third pass after the racy window read {} files again: {:#?}\nfirst plan: {:#?}",
            idle.files_hashed, idle.plan.ops, plan.ops
        ));
    }
    Ok(())
}

/// Paths and kinds, for failure messages.
fn brief(tree: &[(RelPath, Entry)]) -> Vec<String> {
    tree.iter()
        .map(|(p, e)| format!("{} {p}", e.kind()))
        .collect()
}

/// Differences between SRC (read by the independent walker) and the memory replica: paths,
/// kinds, content hashes, symlink targets, modes, mtimes, owners, hard links, and the root's
/// mode and mtime.
fn memory_diff(src: &Path, mem: &MemoryReplica) -> Vec<String> {
    let mut got = Snapshot::new();
    let mut root = None;
    for (p, e) in mem.tree() {
        if p.is_root() {
            root = Some(e);
            continue;
        }
        let (kind, content, link) = match &e.content {
            Content::File { hash, .. } => (Kind::File, *hash, None),
            Content::Dir { .. } => (Kind::Dir, None, None),
            Content::Symlink { target } => (Kind::Symlink, None, Some(target.clone())),
            Content::Special => (Kind::Other, None, None),
        };
        got.insert(
            p.as_bytes().to_vec(),
            Node {
                kind,
                content,
                link,
                mode: e.meta.mode,
                mtime_ns: e.meta.mtime.as_nanos(),
                uid: e.meta.uid,
                gid: e.meta.gid,
                ino: e.fp.node().map_or(0, |(_, ino)| ino),
            },
        );
    }
    let mut diffs = mirror_diff(&snapshot(src), &got);
    let root = root.expect("the memory replica has a root");
    let md = fs::symlink_metadata(src).unwrap();
    let want = Meta::of_metadata(&md);
    if (root.meta.mode, root.meta.mtime) != (want.mode, want.mtime) {
        diffs.push(format!(
            "root: SRC mode {:#o} mtime {:?}, memory mode {:#o} mtime {:?}",
            want.mode, want.mtime, root.meta.mode, root.meta.mtime
        ));
    }
    diffs
}

/// Runs one sequence against both replicas. The final sync waits out the racy window first,
/// so that the pass after it must read nothing.
fn run_case(steps: &[Step], with_binary: bool) -> Result<(), TestCaseError> {
    let fx = Fixture::default();
    let owners = is_root();
    let mem = MemoryReplica::new(owners);
    let pair = Pair::new(&fx.src, owners);
    let fail = |at: usize, what: String| {
        let step = steps
            .get(at)
            .map_or_else(|| "the final sync".to_owned(), |s| format!("{s:?}"));
        TestCaseError::fail(format!("step {at} ({step}): {what}"))
    };
    let sync_step = Step::Sync;
    for (i, step) in steps.iter().chain(std::iter::once(&sync_step)).enumerate() {
        let last = i == steps.len();
        match step {
            Step::Edit(op) => edit(&fx.src, op),
            Step::Sync => {
                if with_binary {
                    binary_sync(&fx).map_err(|e| fail(i, format!("binary: {e}")))?;
                }
                if last {
                    past_racy_window();
                }
                memory_sync(&pair, &fx.src, &mem, None, last)
                    .map_err(|e| fail(i, format!("memory: {e}")))?;
            }
            Step::Kill(n) => {
                if with_binary {
                    binary_kill(&fx, *n).map_err(|e| fail(i, format!("binary: {e}")))?;
                }
                memory_sync(&pair, &fx.src, &mem, Some(*n), false)
                    .map_err(|e| fail(i, format!("memory: {e}")))?;
            }
        }
    }
    Ok(())
}

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        max_shrink_iters: 400,
        max_shrink_time: 120_000,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// The binary and the memory replica, the same sequences.
#[test]
fn model_binary_and_memory_replica_mirror_the_source_after_every_sync() {
    let mut runner = TestRunner::new(config(cases(1)));
    let started = std::time::Instant::now();
    let result = runner.run(&steps_strategy(40), |steps| run_case(&steps, true));
    eprintln!(
        "model (binary + memory): {} cases in {:.1}s",
        cases(1),
        started.elapsed().as_secs_f64()
    );
    if let Err(e) = result {
        panic!("{e}");
    }
}

/// The memory replica alone: cheap, so more and longer sequences.
#[test]
fn model_memory_replica_mirrors_the_source_after_every_sync() {
    let mut runner = TestRunner::new(config(cases(4)));
    let started = std::time::Instant::now();
    let result = runner.run(&steps_strategy(80), |steps| run_case(&steps, false));
    eprintln!(
        "model (memory only): {} cases in {:.1}s",
        cases(4),
        started.elapsed().as_secs_f64()
    );
    if let Err(e) = result {
        panic!("{e}");
    }
}

/// The model must be able to fail: a replica edited behind the engine's back, in a way the
/// engine cannot see (the memory replica's tree is what the engine reads, so this tampers with
/// the source instead, after the comparison's snapshot would have been taken), is reported.
#[test]
fn model_comparison_catches_a_difference() {
    let fx = Fixture::default();
    let owners = is_root();
    let mem = MemoryReplica::new(owners);
    let pair = Pair::new(&fx.src, owners);
    write(&fx.src.join("d/f"), b"one");
    memory_sync(&pair, &fx.src, &mem, None, false).unwrap();
    // Same size, new bytes, mtime put back: the memory replica still holds the old bytes.
    edit(&fx.src, &Op::Create(0, 1));
    let md = fs::symlink_metadata(fx.src.join("d/f")).unwrap();
    fs::write(fx.src.join("d/f"), b"two").unwrap();
    filetime::set_file_mtime(
        fx.src.join("d/f"),
        filetime::FileTime::from_last_modification_time(&md),
    )
    .unwrap();
    let diffs = memory_diff(&fx.src, &mem);
    assert!(
        diffs.iter().any(|d| d.contains("d/f: content differs")),
        "{diffs:?}"
    );
    assert!(diffs.iter().any(|d| d.contains("a: missing")), "{diffs:?}");
}
