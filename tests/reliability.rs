//! Reliability tests of the `dirsync` binary: a crash after any operation, a full disk, a
//! damaged index, unwritable parts of the replica, a source that changes while it is synced,
//! racy timestamps, and a replica attacked with symlinks.
//!
//! Like `cli.rs`, every test checks the outcome on disk with the independent walker in
//! `common`, never with dirsync's own code. Every dirsync run is also checked for a panic.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

// =============================================================================================
// Helpers
// =============================================================================================

/// How one dirsync run ended.
#[derive(Debug)]
struct Run {
    code: Option<i32>,
    signal: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    fn describe(&self) -> String {
        format!(
            "exit code {:?}, signal {:?}\nstdout:\n{}\nstderr:\n{}",
            self.code, self.signal, self.stdout, self.stderr
        )
    }

    #[track_caller]
    fn expect_code(&self, code: i32, what: &str) -> &Self {
        assert_eq!(
            self.code,
            Some(code),
            "{what}: expected exit {code}; {}",
            self.describe()
        );
        self
    }
}

const SIGKILL: i32 = 9;

/// Runs `dirsync SUB SRC DST ARGS...` with extra environment; panics if dirsync panicked.
#[track_caller]
fn run_on(fx: &Fixture, sub: &str, dst: &Path, args: &[&str], env: &[(&str, String)]) -> Run {
    let mut cmd = fx.cmd();
    cmd.arg(sub).arg(&fx.src).arg(dst).args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run dirsync");
    let run = Run {
        code: out.status.code(),
        signal: out.status.signal(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    assert!(
        !run.stderr.contains("panicked"),
        "dirsync {sub} panicked: {}",
        run.describe()
    );
    run
}

#[track_caller]
fn run(fx: &Fixture, sub: &str, args: &[&str]) -> Run {
    run_on(fx, sub, &fx.dst, args, &[])
}

/// `sync` must exit 0 and leave an exact mirror with no temporary files, and `status` must then
/// find nothing to do.
#[track_caller]
fn sync_converges(fx: &Fixture, what: &str) -> Run {
    let r = run(fx, "sync", &[]);
    r.expect_code(0, what);
    assert_no_temps(&fx.dst);
    assert_mirror(&fx.src, &fx.dst);
    fx.assert_up_to_date();
    r
}

fn is_temp(rel: &[u8]) -> bool {
    rel.split(|&b| b == b'/')
        .any(|name| name.starts_with(b".dirsync-tmp-"))
}

/// Paths below `root` whose name starts with the temporary prefix.
fn temps(root: &Path) -> Vec<String> {
    snapshot(root)
        .keys()
        .filter(|k| is_temp(k))
        .map(|k| show(k))
        .collect()
}

#[track_caller]
fn assert_no_temps(root: &Path) {
    let t = temps(root);
    assert!(t.is_empty(), "temporary names left in the replica: {t:?}");
}

/// The `<size> written` figure of the `synced:` summary, as the interval of byte counts that
/// its one-decimal rounding can stand for.
#[track_caller]
fn copied_bytes(stderr: &str) -> (f64, f64) {
    parse_summary(stderr); // checks the shape of the line
    let line = stderr
        .lines()
        .find_map(|l| l.trim_start().strip_prefix("synced: "))
        .unwrap();
    let part = line.split(", ").nth(7).unwrap();
    let mut words = part.split(' ');
    let v: f64 = words.next().unwrap().parse().unwrap();
    let unit = words.next().unwrap();
    let scale = match unit {
        "B" => return (v, v),
        "KiB" => 1024.0,
        "MiB" => 1024.0 * 1024.0,
        "GiB" => 1024.0 * 1024.0 * 1024.0,
        other => panic!("unknown unit {other:?} in {line:?}"),
    };
    ((v - 0.05) * scale, (v + 0.05) * scale)
}

/// The replica paths a `--log-file` says got new file content (`A`, `M`, `T` of a path that is
/// a file in `files`, and the target of `C`).
fn file_writes(log: &Path, files: &BTreeSet<String>) -> BTreeSet<String> {
    let text = fs::read_to_string(log).unwrap_or_default();
    parse_log(&text)
        .into_iter()
        .filter_map(|l| match l {
            LogLine::Op { letter, rest } => match letter {
                'A' | 'M' | 'T' if files.contains(&rest) => Some(rest),
                'C' => rest.split_once(" -> ").map(|(_, to)| to.to_owned()),
                _ => None,
            },
            LogLine::Summary(_) => None,
        })
        .collect()
}

fn count_log_ops(log: &Path) -> usize {
    let text = fs::read_to_string(log).unwrap();
    parse_log(&text)
        .iter()
        .filter(|l| matches!(l, LogLine::Op { .. }))
        .count()
}

/// Files of a snapshot, by path, as strings (the trees here have ASCII names).
fn file_paths(snap: &Snapshot) -> BTreeSet<String> {
    snap.iter()
        .filter(|(_, n)| n.kind == Kind::File)
        .map(|(k, _)| show(k))
        .collect()
}

/// Every node in the replica that is not a temporary is one that some version of the source
/// had at that path: same kind, and for files the same bytes. This is what "a crash sees the
/// old node or the new one, never a partial one" means when looked at from outside.
#[track_caller]
fn assert_only_whole_versions(dst: &Path, versions: &[&Snapshot], what: &str) {
    if fs::symlink_metadata(dst).is_err() {
        return; // killed before the replica was created: nothing is in place
    }
    let mut bad = Vec::new();
    for (path, node) in snapshot(dst) {
        if is_temp(&path) {
            continue;
        }
        let ok = versions.iter().any(|v| {
            v.get(&path).is_some_and(|s| {
                s.kind == node.kind && s.content == node.content && s.link == node.link
            })
        });
        if !ok {
            bad.push(format!("{} ({:?})", show(&path), node.kind));
        }
    }
    assert!(
        bad.is_empty(),
        "{what}: {} replica path(s) hold something no version of the source had (partial or \
         foreign content): {:?}",
        bad.len(),
        &bad[..bad.len().min(20)]
    );
}

/// Inode and ctime of every entry below `root`, by path, without reading any file: proves that
/// nothing was written at all, more cheaply than [`ctimes`].
fn stat_ctimes(root: &Path) -> BTreeMap<PathBuf, (u64, i64, i64)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            let md = e.metadata().unwrap();
            if md.is_dir() {
                stack.push(e.path());
            }
            out.insert(e.path(), (md.ino(), md.ctime(), md.ctime_nsec()));
        }
    }
    out
}

/// Whether `stderr` says that the disk is full.
fn says_disk_full(stderr: &str) -> bool {
    let s = stderr.to_lowercase();
    s.contains("no space left") || s.contains("filesystem is full")
}

fn remove_tree(path: &Path) {
    if fs::symlink_metadata(path).is_ok() {
        fs::remove_dir_all(path).unwrap_or_else(|e| panic!("rm -rf {}: {e}", path.display()));
    }
}

/// A splitmix64 stream, for deterministic "random" choices.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

// =============================================================================================
// 1. Kill anywhere
// =============================================================================================

/// 2,000 small files in 3 levels of directories (400 directories), a few symlinks and empty
/// directories, and three files of 8 MiB whose paths sort in the middle of the tree.
fn make_kill_source(src: &Path) {
    for i in 0..2000u64 {
        let rel = format!("d{:02}/s{}/t{}/f{i:04}.bin", i % 16, i % 5, i % 5 % 3);
        let len = (i as usize * 7919) % 6000;
        let path = src.join(rel);
        write(&path, bytes(i, len));
        if i % 7 == 0 {
            set_mode(&path, 0o600);
        }
    }
    for b in 0..3u64 {
        write(
            &src.join(format!("d07/big{b}/huge.bin")),
            bytes(10_000 + b, 8 << 20),
        );
    }
    for i in 0..20 {
        symlink(
            format!("../f{i:04}.bin"),
            &src.join(format!("d{:02}/link{i}", i % 16)),
        );
        mkdir(&src.join(format!("empty{i}/inner")));
    }
}

/// Spreads `count` kill points over `1..=total`, plus the first three and the last two.
fn kill_points(total: usize, count: usize) -> Vec<usize> {
    let mut points: BTreeSet<usize> = [1, 2, 3, total - 1, total].into_iter().collect();
    for k in 1..=count {
        points.insert(1 + (total - 1) * k / (count + 1));
    }
    points.into_iter().filter(|&n| n >= 1).collect()
}

#[test]
fn kill_after_any_operation_then_resync_converges_without_redoing_work() {
    let fx = Fixture::default();
    make_kill_source(&fx.src);
    let src_snap = snapshot(&fx.src);
    let src_files = file_paths(&src_snap);

    // A reference run into another replica gives the number of operations of a full sync and
    // what it copies.
    let ref_dst = fx.root.join("ref-dst");
    let ref_log = fx.root.join("ref.log");
    let ref_index = fx.root.join("ref.redb");
    let ref_index = ref_index.to_str().unwrap();
    let status = run_on(&fx, "status", &ref_dst, &["--index", ref_index], &[]);
    status.expect_code(0, "status of a fresh replica");
    let status_lines = status.stdout.lines().count();
    let full = run_on(
        &fx,
        "sync",
        &ref_dst,
        &[
            "--index",
            ref_index,
            "--log-file",
            ref_log.to_str().unwrap(),
        ],
        &[],
    );
    full.expect_code(0, "reference sync");
    assert_mirror(&fx.src, &ref_dst);
    let total = count_log_ops(&ref_log);
    assert!(
        total >= status_lines && status_lines > 2000,
        "a full sync applied {total} operations for {status_lines} status lines"
    );
    let full_bytes = copied_bytes(&full.stderr);
    let full_writes = file_writes(&ref_log, &src_files);
    assert_eq!(full_writes.len(), src_files.len());

    let points = kill_points(total, 18);
    assert!(points.len() >= 20);
    let started = Instant::now();
    for &n in &points {
        remove_tree(&fx.dst);
        remove_tree(&fx.state.join("dirsync"));
        let killed_log = fx.root.join("killed.log");
        let resume_log = fx.root.join("resume.log");
        let _ = fs::remove_file(&killed_log);
        let _ = fs::remove_file(&resume_log);
        let ctx = format!("killed after operation {n} of {total}");

        let killed = run_on(
            &fx,
            "sync",
            &fx.dst,
            &["--log-file", killed_log.to_str().unwrap()],
            &[("DIRSYNC_FAULT_KILL_AFTER", n.to_string())],
        );
        assert_eq!(
            killed.signal,
            Some(SIGKILL),
            "{ctx}: the fault hook should kill the sync; {}",
            killed.describe()
        );
        assert_only_whole_versions(&fx.dst, &[&src_snap], &ctx);
        let done_before = file_writes(&killed_log, &src_files);

        let resume = run_on(
            &fx,
            "sync",
            &fx.dst,
            &["--log-file", resume_log.to_str().unwrap()],
            &[],
        );
        resume.expect_code(0, &format!("{ctx}: the resuming sync"));
        let dst_snap = snapshot(&fx.dst);
        let leftovers: Vec<String> = dst_snap
            .keys()
            .filter(|k| is_temp(k))
            .map(|k| show(k))
            .collect();
        assert!(
            leftovers.is_empty(),
            "{ctx}: temporary names left: {leftovers:?}"
        );
        assert_snapshots_mirror(&src_snap, &dst_snap, &format!("{ctx}: DST is not a mirror"));

        // The index opens and is complete: a third sync does nothing at all.
        let before = stat_ctimes(&fx.dst);
        let third = run(&fx, "sync", &[]);
        third.expect_code(0, &format!("{ctx}: the third sync"));
        assert_eq!(
            parse_summary(&third.stderr),
            Summary::default(),
            "{ctx}: the third sync should be a no-op: {}",
            third.stderr
        );
        assert_eq!(copied_bytes(&third.stderr), (0.0, 0.0));
        assert!(
            before == stat_ctimes(&fx.dst),
            "{ctx}: the third sync wrote to DST"
        );
        fx.assert_up_to_date();

        // Nothing the killed run logged as done is copied again, and the resume copies less
        // than a full sync whenever the killed run had copied anything.
        let resume_writes = file_writes(&resume_log, &src_files);
        let redone: Vec<&String> = resume_writes.intersection(&done_before).collect();
        assert!(
            redone.is_empty(),
            "{ctx}: the resume copied again {} file(s) the killed run had finished: {:?}",
            redone.len(),
            &redone[..redone.len().min(10)]
        );
        assert!(
            resume_writes.len() + done_before.len() <= full_writes.len(),
            "{ctx}: {} files copied by the resume + {} by the killed run > {} in a full sync",
            resume_writes.len(),
            done_before.len(),
            full_writes.len()
        );
        let done_bytes: u64 = done_before
            .iter()
            .map(|p| fs::metadata(fx.src.join(p)).unwrap().len())
            .sum();
        let resume_bytes = copied_bytes(&resume.stderr);
        assert!(
            resume_bytes.0 + done_bytes as f64 <= full_bytes.1,
            "{ctx}: the resume copied {resume_bytes:?} bytes, the killed run {done_bytes}, a \
             full sync {full_bytes:?}"
        );
        if done_bytes > 0 {
            assert!(
                resume_writes.len() < full_writes.len() && resume_bytes.0 < full_bytes.1,
                "{ctx}: the resume copied as much as a full sync ({} files, {resume_bytes:?} bytes)",
                resume_writes.len()
            );
        }
    }
    eprintln!(
        "kill anywhere: {} kill points over {total} operations in {:.1}s",
        points.len(),
        started.elapsed().as_secs_f64()
    );
}

/// The fault hook kills between operations; a real crash can also come in the middle of one.
/// SIGKILL at random moments of a sync of big files: whatever is in place is a whole version
/// of a source file, and the next sync removes the temporaries and converges. The kill times
/// are drawn from how long a whole sync takes here, and most of them must land inside one.
#[test]
fn sigkill_at_random_moments_never_leaves_a_partial_file_in_place() {
    let fx = Fixture::default();
    make_tree(&fx.src, 200);
    for b in 0..4u64 {
        write(
            &fx.src.join(format!("big/b{b}.bin")),
            bytes(20_000 + b, 8 << 20),
        );
    }
    let v0 = snapshot(&fx.src);
    // How long a whole initial sync takes on this machine (the faster of two): the kills land
    // inside one.
    let mut whole = u64::MAX;
    for _ in 0..2 {
        remove_tree(&fx.dst);
        remove_tree(&fx.state.join("dirsync"));
        let t = Instant::now();
        run(&fx, "sync", &[]).expect_code(0, "the timing sync");
        whole = whole.min((t.elapsed().as_millis() as u64).max(1));
    }
    let mut rng = Rng(7);
    let (mut temps_seen, mut killed, mut rounds) = (0, 0, 0);
    // At least 10 rounds; more (up to 30) while fewer than 3 kills landed inside a sync, each
    // miss drawing later kills from a shorter span (a busy machine makes the timing syncs slow).
    for round in 0..30 {
        if round >= 10 && killed >= 3 {
            break;
        }
        rounds += 1;
        remove_tree(&fx.dst);
        remove_tree(&fx.state.join("dirsync"));
        let mut cmd = fx.std_cmd();
        cmd.arg("sync").arg(&fx.src).arg(&fx.dst);
        let mut sync = Background::spawn(cmd, &fx.root.join("sync.stderr"));
        thread::sleep(Duration::from_millis(rng.below(whole)));
        sync.signal(rustix::process::Signal::KILL);
        let status = sync
            .wait_timeout(Duration::from_secs(20))
            .expect("a killed sync ends");
        if status.signal().is_some() {
            killed += 1;
        } else {
            whole = (whole * 3 / 4).max(1);
        }
        let ctx = format!("round {round}, ended with {status}");
        assert_only_whole_versions(&fx.dst, &[&v0], &ctx);
        if fx.dst.exists() && !temps(&fx.dst).is_empty() {
            temps_seen += 1;
        }
        let r = run(&fx, "sync", &[]);
        r.expect_code(0, &format!("{ctx}: the resuming sync"));
        assert_no_temps(&fx.dst);
        assert_snapshots_mirror(&v0, &snapshot(&fx.dst), &format!("{ctx}: not a mirror"));
    }
    eprintln!("random SIGKILL: {killed} of {rounds} syncs killed, {temps_seen} left temporaries");
    assert!(
        killed >= 3,
        "only {killed} of {rounds} kills landed inside a sync (last span {whole} ms)"
    );
}

/// The base tree of the kill-then-modify scenario: 400 small files and an 8 MiB file.
fn modify_scenario_base(fx: &Fixture) {
    make_tree(&fx.src, 400);
    write(&fx.src.join("big/b0.bin"), bytes(77, 8 << 20));
    write(&fx.src.join("big/b1.bin"), bytes(78, 3 << 20));
    run(fx, "sync", &[]).expect_code(0, "initial sync");
}

/// The changes the killed sync is replicating: a directory move, a file move, edits, deletions,
/// additions, a type change, a rewritten big file.
fn modify_scenario_first(src: &Path) {
    fs::rename(src.join("d1"), src.join("d1-moved")).unwrap();
    fs::rename(src.join("f0004.dat"), src.join("d0/renamed.dat")).unwrap();
    for i in (2..400).step_by(20) {
        let p = src.join(format!("d2/s{}/f{i:04}.dat", i % 3));
        if p.exists() {
            write(&p, format!("edited {i}\n"));
        }
    }
    for i in (3..400).step_by(20) {
        let p = src.join(format!("d3/s{}/f{i:04}.dat", i % 3));
        let _ = fs::remove_file(p);
    }
    for i in 0..30 {
        write(&src.join(format!("fresh/n{i:02}.txt")), bytes(500 + i, 700));
    }
    fs::remove_file(src.join("f0000.dat")).unwrap();
    write(&src.join("f0000.dat/now-a-dir.txt"), "type change\n");
    write(&src.join("big/b0.bin"), bytes(79, 8 << 20));
}

/// What changes after the crash, before the resume: the moved directory moves again, the
/// other directory moves too, files change inside them, new content replaces the big files.
fn modify_scenario_second(src: &Path) {
    fs::rename(src.join("d1-moved"), src.join("d1-again")).unwrap();
    fs::rename(src.join("d2"), src.join("d2-moved")).unwrap();
    for i in (1..400).step_by(40) {
        let p = src.join(format!("d1-again/s{}/f{i:04}.dat", i % 3));
        if p.exists() {
            write(&p, format!("edited again {i}\n"));
        }
    }
    fs::remove_file(src.join("fresh/n05.txt")).unwrap();
    fs::rename(src.join("fresh/n06.txt"), src.join("fresh/n07.txt")).unwrap();
    let mut f = fs::OpenOptions::new()
        .append(true)
        .open(src.join("big/b0.bin"))
        .unwrap();
    f.write_all(b"appended after the crash").unwrap();
    fs::rename(src.join("big/b1.bin"), src.join("big/b1-renamed.bin")).unwrap();
    fs::remove_dir_all(src.join("f0000.dat")).unwrap();
    symlink("d1-again", &src.join("f0000.dat"));
}

#[test]
fn kill_mid_way_then_modify_the_source_then_resync_converges() {
    // The operation count of the sync that gets killed, from a reference run.
    let total = {
        let fx = Fixture::default();
        modify_scenario_base(&fx);
        modify_scenario_first(&fx.src);
        let log = fx.root.join("ref.log");
        run(&fx, "sync", &["--log-file", log.to_str().unwrap()]).expect_code(0, "reference sync");
        count_log_ops(&log)
    };
    let points: Vec<usize> = [
        1,
        2,
        3,
        total / 8,
        total / 3,
        total / 2,
        total * 3 / 4,
        total - 1,
    ]
    .into_iter()
    .collect::<BTreeSet<_>>()
    .into_iter()
    .filter(|&n| n >= 1)
    .collect();
    for n in points {
        let fx = Fixture::default();
        modify_scenario_base(&fx);
        let v0 = snapshot(&fx.src);
        modify_scenario_first(&fx.src);
        let v1 = snapshot(&fx.src);
        let ctx = format!("killed after operation {n} of {total}, then modified");
        let killed = run_on(
            &fx,
            "sync",
            &fx.dst,
            &[],
            &[("DIRSYNC_FAULT_KILL_AFTER", n.to_string())],
        );
        assert_eq!(killed.signal, Some(SIGKILL), "{ctx}: {}", killed.describe());
        assert_only_whole_versions(&fx.dst, &[&v0, &v1], &ctx);
        modify_scenario_second(&fx.src);
        sync_converges(&fx, &ctx);
    }
}

// =============================================================================================
// 2. Full disk
// =============================================================================================

/// A tmpfs mounted for as long as this lives.
struct Tmpfs(PathBuf);

impl Tmpfs {
    /// `None` (with a note) when mounting is not possible here, e.g. not root.
    fn mount(dir: &Path, size: &str) -> Option<Tmpfs> {
        let status = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0755"),
                "tmpfs",
            ])
            .arg(dir)
            .stderr(std::process::Stdio::null())
            .status();
        match status {
            Ok(s) if s.success() => Some(Tmpfs(dir.to_path_buf())),
            other => {
                eprintln!(
                    "note: cannot mount a tmpfs at {} ({other:?}); test skipped",
                    dir.display()
                );
                None
            }
        }
    }

    /// Changes the size, keeping the contents.
    #[track_caller]
    fn resize(&self, size: &str) {
        let status = std::process::Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .status()
            .unwrap();
        assert!(status.success(), "remount {} size={size}", self.0.display());
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = std::process::Command::new("umount")
            .arg(&self.0)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
}

/// Writes `path` until the filesystem is full; returns the bytes written.
fn fill_up(path: &Path) -> u64 {
    let mut f = fs::File::create(path).unwrap();
    let mut n = 0;
    for chunk in [1 << 20, 64 << 10, 4 << 10, 512] {
        let buf = vec![0xa5u8; chunk];
        while f.write_all(&buf).is_ok() {
            n += chunk as u64;
        }
    }
    n
}

#[test]
fn full_disk_gives_exit_3_never_a_partial_file_and_converges_when_space_returns() {
    let fx = Fixture::default();
    let mnt = fx.root.join("mnt");
    mkdir(&mnt);
    let Some(disk) = Tmpfs::mount(&mnt, "4m") else {
        return;
    };
    let dst = mnt.join("dst");
    // 6 MiB of big files and some small ones, for a 4 MiB disk.
    for i in 0..12u64 {
        write(
            &fx.src.join(format!("big{}/f{i:02}.bin", i % 3)),
            bytes(i, 512 << 10),
        );
    }
    for i in 0..100u64 {
        write(
            &fx.src.join(format!("small/s{i:03}.txt")),
            bytes(100 + i, 1500),
        );
    }
    let v0 = snapshot(&fx.src);

    let r = run_on(&fx, "sync", &dst, &[], &[]);
    r.expect_code(3, "sync onto a disk that is too small");
    assert!(
        says_disk_full(&r.stderr),
        "the message should say the disk is full: {}",
        r.stderr
    );
    assert!(parse_summary(&r.stderr).errors >= 1, "{}", r.stderr);
    assert_no_temps(&dst);
    assert_only_whole_versions(&dst, &[&v0], "after running out of space");
    let got = snapshot(&dst);
    let missing: Vec<String> = file_paths(&v0)
        .into_iter()
        .filter(|p| !got.contains_key(p.as_bytes()))
        .collect();
    assert!(!missing.is_empty(), "precondition: some files did not fit");
    assert!(
        missing.iter().any(|p| r.stderr.contains(p.as_str())),
        "none of the files missing from the replica is named on stderr: {}",
        r.stderr
    );

    // More space: the same replica converges, with the same index.
    disk.resize("64m");
    let r = run_on(&fx, "sync", &dst, &[], &[]);
    r.expect_code(0, "sync after the disk grew");
    assert_no_temps(&dst);
    assert_mirror(&fx.src, &dst);

    // Replacing files on a full disk: every old file stays whole until its new version fits.
    let filled = fill_up(&mnt.join("filler"));
    assert!(filled > 0);
    for i in 0..6u64 {
        let p = fx.src.join(format!("big{}/f{i:02}.bin", i % 3));
        write(&p, bytes(1000 + i, 512 << 10));
    }
    for i in 6..9u64 {
        let p = fx.src.join(format!("big{}/f{i:02}.bin", i % 3));
        let mut f = fs::OpenOptions::new().append(true).open(p).unwrap();
        f.write_all(&bytes(2000 + i, 100 << 10)).unwrap();
    }
    write(&fx.src.join("big0/new.bin"), bytes(3000, 300 << 10));
    let v1 = snapshot(&fx.src);
    let r = run_on(&fx, "sync", &dst, &[], &[]);
    r.expect_code(3, "replacing files on a full disk");
    assert!(says_disk_full(&r.stderr), "{}", r.stderr);
    assert_no_temps(&dst);
    assert_only_whole_versions(&dst, &[&v0, &v1], "replacing files on a full disk");
    let got = snapshot(&dst);
    for p in file_paths(&v0) {
        assert!(
            got.contains_key(p.as_bytes()),
            "{p} was in the replica and still is in the source, but was lost on a full disk"
        );
    }

    fs::remove_file(mnt.join("filler")).unwrap();
    let r = run_on(&fx, "sync", &dst, &[], &[]);
    r.expect_code(0, "sync after space was freed");
    assert_no_temps(&dst);
    assert_mirror(&fx.src, &dst);
    drop(disk);
}

/// The index on the disk that fills up: that is a full disk, not a damaged index. The sync
/// must say so, must not exit 1 ("nothing was changed") after it changed the replica, must not
/// send the user to `--reindex`, and must converge once there is space, with the same index.
#[test]
fn full_disk_holding_the_index_is_reported_as_a_full_disk_not_a_damaged_index() {
    let fx = Fixture::default();
    let mnt = fx.root.join("mnt");
    mkdir(&mnt);
    let Some(disk) = Tmpfs::mount(&mnt, "4m") else {
        return;
    };
    let dst = mnt.join("dst");
    let index = mnt.join("index.redb");
    let idx = index.to_str().unwrap();
    for i in 0..12u64 {
        write(
            &fx.src.join(format!("big/f{i:02}.bin")),
            bytes(i, 512 << 10),
        );
    }
    for i in 0..300u64 {
        write(
            &fx.src.join(format!("small/s{i:03}.txt")),
            bytes(100 + i, 700),
        );
    }
    let v0 = snapshot(&fx.src);
    for attempt in 0..2 {
        let r = run_on(&fx, "sync", &dst, &["--index", idx], &[]);
        let ctx = format!("sync {attempt} with the index on a full disk");
        assert!(matches!(r.code, Some(1 | 3)), "{ctx}: {}", r.describe());
        assert!(
            says_disk_full(&r.stderr),
            "{ctx}: the message should say the disk is full: {}",
            r.stderr
        );
        assert!(
            !r.stderr.contains("--reindex") && !r.stderr.contains("cannot be read"),
            "{ctx}: a full disk is not a damaged index; --reindex would not help: {}",
            r.stderr
        );
        if r.code == Some(1) {
            assert!(
                snapshot(&dst).is_empty(),
                "{ctx}: exit 1 means nothing was changed, but the replica holds {} entries",
                snapshot(&dst).len()
            );
        }
        assert_no_temps(&dst);
        assert_only_whole_versions(&dst, &[&v0], &ctx);
    }
    disk.resize("64m");
    run_on(&fx, "sync", &dst, &["--index", idx], &[]).expect_code(0, "sync after the disk grew");
    assert_no_temps(&dst);
    assert_mirror(&fx.src, &dst);
    let st = run_on(&fx, "status", &dst, &["--index", idx], &[]);
    st.expect_code(0, "status after convergence");
    assert_eq!(st.stdout, "");
    drop(disk);
}

// =============================================================================================
// 3. Damaged index
// =============================================================================================

/// A synced fixture whose index is at a known path, `root/index.redb`.
fn indexed_fixture() -> (Fixture, PathBuf) {
    let fx = Fixture::default();
    make_tree(&fx.src, 60);
    let index = fx.root.join("index.redb");
    run(&fx, "sync", &["--index", index.to_str().unwrap()]).expect_code(0, "first sync");
    (fx, index)
}

/// `sync` and `status` with the index at `index` must refuse (exit 1) with a message naming the
/// index file and `--reindex`, leave the replica as it was, and must not panic; `sync
/// --reindex` must then converge. (The index file's bytes may change: redb writes its header
/// when it opens a file.)
#[track_caller]
fn assert_damaged_index_is_fatal(fx: &Fixture, index: &Path, what: &str) {
    let idx = index.to_str().unwrap();
    let shown = fs::canonicalize(index.parent().unwrap())
        .unwrap()
        .join(index.file_name().unwrap());
    let shown = shown.to_str().unwrap();
    write(&fx.src.join(format!("new-{}.txt", what.len())), what);
    let dst_before = snapshot(&fx.dst);
    for sub in ["sync", "status"] {
        let r = run(fx, sub, &["--index", idx]);
        r.expect_code(1, &format!("{sub} with {what}"));
        assert!(
            r.stderr.contains(shown),
            "{sub} with {what}: the message should name the index {shown}: {}",
            r.stderr
        );
        assert!(
            r.stderr.contains("--reindex"),
            "{sub} with {what}: the message should mention --reindex: {}",
            r.stderr
        );
        assert_unchanged(
            &dst_before,
            &snapshot(&fx.dst),
            &format!("{sub} with {what}"),
        );
    }
    let r = run(fx, "sync", &["--index", idx, "--reindex"]);
    r.expect_code(0, &format!("sync --reindex after {what}"));
    assert_no_temps(&fx.dst);
    assert_mirror(&fx.src, &fx.dst);
    let again = run(fx, "status", &["--index", idx]);
    again.expect_code(0, "status after --reindex");
    assert_eq!(again.stdout, "", "status after --reindex: {}", again.stderr);
}

#[test]
fn damaged_index_truncated_to_half() {
    let (fx, index) = indexed_fixture();
    let len = fs::metadata(&index).unwrap().len();
    fs::OpenOptions::new()
        .write(true)
        .open(&index)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    assert_damaged_index_is_fatal(&fx, &index, "an index truncated to half");
}

#[test]
fn damaged_index_truncated_to_one_page() {
    let (fx, index) = indexed_fixture();
    fs::OpenOptions::new()
        .write(true)
        .open(&index)
        .unwrap()
        .set_len(4096)
        .unwrap();
    assert_damaged_index_is_fatal(&fx, &index, "an index truncated to 4 KiB");
}

#[test]
fn damaged_index_full_of_garbage() {
    let (fx, index) = indexed_fixture();
    let len = fs::metadata(&index).unwrap().len() as usize;
    fs::write(&index, bytes(5, len)).unwrap();
    assert_damaged_index_is_fatal(&fx, &index, "an index full of garbage");
}

#[test]
fn damaged_index_with_garbage_after_a_valid_header() {
    let (fx, index) = indexed_fixture();
    let mut data = fs::read(&index).unwrap();
    let garbage = bytes(6, data.len());
    data[4096..].copy_from_slice(&garbage[4096..]);
    fs::write(&index, data).unwrap();
    assert_damaged_index_is_fatal(&fx, &index, "garbage after a valid index header");
}

/// Writes a fresh redb database at `path` with `fill`.
fn write_redb(path: &Path, fill: impl FnOnce(&redb::WriteTransaction)) {
    let _ = fs::remove_file(path);
    let db = redb::Database::create(path).unwrap();
    let tx = db.begin_write().unwrap();
    fill(&tx);
    tx.commit().unwrap();
}

const META: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("meta");
const SOURCE: redb::TableDefinition<&[u8], &[u8]> = redb::TableDefinition::new("source");
const REPLICA: redb::TableDefinition<&[u8], &[u8]> = redb::TableDefinition::new("replica");

/// The `meta` rows of a real index for this fixture, with another schema version.
fn meta_rows(fx: &Fixture, tx: &redb::WriteTransaction, schema: u32) {
    let mut meta = tx.open_table(META).unwrap();
    let src = fs::canonicalize(&fx.src).unwrap();
    let dst = fs::canonicalize(&fx.dst).unwrap();
    meta.insert("schema", &schema.to_le_bytes()[..]).unwrap();
    meta.insert("source", src.as_os_str().as_encoded_bytes())
        .unwrap();
    meta.insert("replica", dst.as_os_str().as_encoded_bytes())
        .unwrap();
}

#[test]
fn damaged_index_valid_redb_with_another_schema_version() {
    let (fx, index) = indexed_fixture();
    write_redb(&index, |tx| {
        meta_rows(&fx, tx, 99);
        tx.open_table(SOURCE).unwrap();
        tx.open_table(REPLICA).unwrap();
    });
    assert_damaged_index_is_fatal(&fx, &index, "an index of schema 99");
}

#[test]
fn damaged_index_valid_redb_with_tables_of_other_types() {
    let (fx, index) = indexed_fixture();
    write_redb(&index, |tx| {
        meta_rows(&fx, tx, 1);
        let def: redb::TableDefinition<u64, u64> = redb::TableDefinition::new("replica");
        tx.open_table(def).unwrap().insert(1, 2).unwrap();
        tx.open_table(SOURCE).unwrap();
    });
    assert_damaged_index_is_fatal(&fx, &index, "an index whose tables have other types");
}

#[test]
fn damaged_index_valid_redb_with_undecodable_entries() {
    let (fx, index) = indexed_fixture();
    {
        let db = redb::Database::create(&index).unwrap();
        let tx = db.begin_write().unwrap();
        tx.open_table(REPLICA)
            .unwrap()
            .insert(&b"f0000.dat"[..], &b"\xff\xff\xff\xff not postcard"[..])
            .unwrap();
        tx.commit().unwrap();
    }
    assert_damaged_index_is_fatal(&fx, &index, "an index with an undecodable entry");
}

#[test]
fn damaged_index_valid_redb_with_an_escaping_path() {
    let (fx, index) = indexed_fixture();
    {
        let db = redb::Database::create(&index).unwrap();
        let tx = db.begin_write().unwrap();
        {
            let mut t = tx.open_table(REPLICA).unwrap();
            let value = redb::ReadableTable::get(&t, &b"f0004.dat"[..])
                .unwrap()
                .unwrap()
                .value()
                .to_vec();
            t.insert(&b"../../etc/passwd"[..], &value[..]).unwrap();
        }
        tx.commit().unwrap();
    }
    assert_damaged_index_is_fatal(&fx, &index, "an index naming ../../etc/passwd");
}

/// A redb file that is not a dirsync index at all (another program's database given as
/// `--index` by mistake) must not be adopted and written into.
#[test]
fn damaged_index_foreign_redb_database_is_not_adopted() {
    let (fx, index) = indexed_fixture();
    let users: redb::TableDefinition<u64, &str> = redb::TableDefinition::new("users");
    write_redb(&index, |tx| {
        let mut t = tx.open_table(users).unwrap();
        t.insert(1, "alice").unwrap();
        t.insert(2, "bob").unwrap();
    });
    let idx = index.to_str().unwrap();
    write(&fx.src.join("new.txt"), "new");
    let r = run(&fx, "sync", &["--index", idx]);
    // The foreign database is intact and holds no table of dirsync's.
    use redb::{ReadableDatabase, TableHandle};
    let db = redb::Database::open(&index).unwrap();
    let tx = db.begin_read().unwrap();
    let tables: Vec<String> = tx
        .list_tables()
        .unwrap()
        .map(|h| h.name().to_owned())
        .collect();
    let t = tx.open_table(users).unwrap();
    assert_eq!(redb::ReadableTableMetadata::len(&t).unwrap(), 2);
    assert_eq!(
        tables,
        ["users"],
        "dirsync wrote its tables into another program's database"
    );
    r.expect_code(1, "sync with another program's redb database as --index");
    assert!(r.stderr.contains(idx), "{}", r.stderr);
}

/// An index file of length zero (a crash right after it was created): `sync` treats it as a
/// new index; `status` must agree and not fail on it.
#[test]
fn empty_index_file_is_treated_alike_by_status_and_sync() {
    let (fx, index) = indexed_fixture();
    let idx = index.to_str().unwrap();
    fs::write(&index, b"").unwrap();
    let status = run(&fx, "status", &["--index", idx]);
    let sync = run(&fx, "sync", &["--index", idx]);
    assert_eq!(
        status.code,
        sync.code,
        "status and sync disagree on an empty index file:\nstatus: {}\nsync: {}",
        status.describe(),
        sync.describe()
    );
    if sync.code == Some(1) {
        assert!(sync.stderr.contains("--reindex"), "{}", sync.stderr);
        assert!(status.stderr.contains("--reindex"), "{}", status.stderr);
    } else {
        assert_mirror(&fx.src, &fx.dst);
    }
}

/// The index is created under a temporary name and renamed into place, so a creation that died
/// leaves a temporary beside it, never a half-written index (the random SIGKILL test above
/// kills creations too). The next sync removes the temporary of the dead process and creates
/// the index.
#[test]
fn temporary_of_a_dead_index_creation_is_removed() {
    let fx = Fixture::default();
    make_tree(&fx.src, 20);
    let index = fx.root.join("index.redb");
    let idx = index.to_str().unwrap();
    // A process id above any pid_max: no such process runs.
    let stale = fx.root.join("index.redb.new-2147483647");
    write(&stale, "half-written");
    run(&fx, "sync", &["--index", idx]).expect_code(0, "sync beside a stale temporary");
    assert!(!stale.exists(), "the dead creation's temporary was left");
    assert_mirror(&fx.src, &fx.dst);
    let temporaries: Vec<_> = fs::read_dir(&fx.root)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().contains(".new-"))
        .collect();
    assert!(
        temporaries.is_empty(),
        "left beside the index: {temporaries:?}"
    );
    run(&fx, "status", &["--index", idx]).expect_code(0, "status on the created index");
}

/// The damaged-index message tells the user what to run; for `status` that advice must work.
#[test]
fn damaged_index_advice_printed_by_status_can_be_followed() {
    let (fx, index) = indexed_fixture();
    let idx = index.to_str().unwrap();
    let len = fs::metadata(&index).unwrap().len();
    fs::OpenOptions::new()
        .write(true)
        .open(&index)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let r = run(&fx, "status", &["--index", idx]);
    r.expect_code(1, "status with a damaged index");
    if r.stderr.contains("the same command with --reindex") {
        let again = run(&fx, "status", &["--index", idx, "--reindex"]);
        assert_ne!(
            again.code,
            Some(2),
            "status told the user to run the same command with --reindex, which is a usage \
             error for status: {}",
            again.describe()
        );
    }
}

// =============================================================================================
// 4. Unwritable parts of the replica
// =============================================================================================

#[test]
fn read_only_directories_and_files_in_the_replica_are_updated() {
    let fx = Fixture::default();
    let s = &fx.src;
    write(&s.join("ro/a.txt"), "aaaa");
    write(&s.join("ro/b.txt"), "bbbb");
    write(&s.join("ro/c.txt"), "cccc");
    write(&s.join("ro/sub/d.txt"), "dddd");
    write(&s.join("top.txt"), "top version 1");
    write(&s.join("rw/x.txt"), "x version 1");
    write(&s.join("ro2/same.txt"), "unchanged");
    set_mode(&s.join("ro2"), 0o555);
    set_mode(&s.join("ro/a.txt"), 0o444);
    set_mode(&s.join("top.txt"), 0o444);
    set_mode(&s.join("ro/sub"), 0o555);
    set_mode(&s.join("ro"), 0o555);
    run(&fx, "sync", &[]).expect_code(0, "first sync");
    assert_mirror(s, &fx.dst);
    assert_eq!(
        fs::metadata(fx.dst.join("ro")).unwrap().mode() & 0o777,
        0o555
    );

    // Changes below read-only directories and to read-only files.
    write(&s.join("ro/a.txt"), "AAAA");
    write(&s.join("ro/new.txt"), "new in a read-only dir");
    fs::remove_file(s.join("ro/b.txt")).unwrap();
    fs::rename(s.join("ro/c.txt"), s.join("ro/sub/c.txt")).unwrap();
    write(&s.join("top.txt"), "top version 2, longer");
    // Drift: parts of the replica made read-only although the source is not.
    set_mode(&fx.dst.join("rw"), 0o555);
    set_mode(&fx.dst.join("rw/x.txt"), 0o444);
    write(&s.join("rw/x.txt"), "x version 2");
    write(&s.join("rw/y.txt"), "y");
    // Drift of metadata only: a read-only directory with no entry changes made writable in the
    // replica, and a read-only file's mode loosened.
    set_mode(&fx.dst.join("ro2"), 0o755);
    set_mode(&fx.dst.join("ro2/same.txt"), 0o666);
    sync_converges(&fx, "sync into read-only parts");
}

/// The changes made to the source below `locked/` and elsewhere, none of them crossing the
/// boundary of `locked/` (unique contents: nothing is a move or copy across it).
fn immutable_scenario(fx: &Fixture) {
    let s = &fx.src;
    write(&s.join("locked/keep.txt"), "keep");
    write(&s.join("locked/edit.txt"), "edit me");
    write(&s.join("locked/gone.txt"), "to be deleted");
    write(&s.join("locked/sub/inner.txt"), "inner");
    write(&s.join("locked/ren-a.txt"), "renamed inside");
    write(&s.join("open/a.txt"), "a");
    write(&s.join("open/b.txt"), "b");
    write(&s.join("open/dir/c.txt"), "c");
    write(&s.join("top.txt"), "top");
    run(fx, "sync", &[]).expect_code(0, "first sync");
}

fn immutable_changes(s: &Path) {
    write(&s.join("locked/new.txt"), "cannot be created");
    write(&s.join("locked/edit.txt"), "edited, cannot be replaced");
    fs::remove_file(s.join("locked/gone.txt")).unwrap();
    fs::rename(s.join("locked/ren-a.txt"), s.join("locked/ren-b.txt")).unwrap();
    write(&s.join("open/a.txt"), "a, edited");
    fs::remove_file(s.join("open/b.txt")).unwrap();
    fs::rename(s.join("open/dir"), s.join("open/dir-moved")).unwrap();
    write(&s.join("open/new/deep.txt"), "new");
    write(&s.join("top.txt"), "top, edited");
    symlink("open", &s.join("link"));
}

fn outside_of(prefix: &[u8], snap: Snapshot) -> Snapshot {
    snap.into_iter()
        .filter(|(k, _)| !(k == prefix || k.starts_with(&[prefix, b"/"].concat())))
        .collect()
}

#[test]
fn immutable_replica_directory_is_reported_the_rest_syncs_and_it_converges_after() {
    let fx = Fixture::default();
    immutable_scenario(&fx);
    immutable_changes(&fx.src);
    let Some(guard) = Immutable::set(&fx.dst.join("locked")) else {
        eprintln!("note: the filesystem has no immutable attribute; test skipped");
        return;
    };
    let locked_before = snapshot(&fx.dst.join("locked"));
    let r = run(&fx, "sync", &[]);
    r.expect_code(3, "sync with an immutable replica directory");
    for p in ["locked/new.txt", "locked/edit.txt", "locked/gone.txt"] {
        assert!(r.stderr.contains(p), "{p} should be reported: {}", r.stderr);
    }
    assert!(parse_summary(&r.stderr).errors >= 3, "{}", r.stderr);
    assert_no_temps(&fx.dst);
    assert_unchanged(
        &locked_before,
        &snapshot(&fx.dst.join("locked")),
        "the immutable directory",
    );
    assert_snapshots_mirror(
        &outside_of(b"locked", snapshot(&fx.src)),
        &outside_of(b"locked", snapshot(&fx.dst)),
        "everything outside the immutable directory should be mirrored",
    );
    drop(guard);
    sync_converges(&fx, "sync after chattr -i");
}

/// A file moved from the immutable directory to elsewhere: the move cannot take it out, but the
/// new path is outside the immutable directory and must still get the file (from the source).
#[test]
fn file_moved_out_of_an_immutable_directory_still_appears_at_its_new_path() {
    let fx = Fixture::default();
    write(
        &fx.src.join("locked/moving.txt"),
        "unique content that moves out",
    );
    write(&fx.src.join("open/stay.txt"), "stay");
    run(&fx, "sync", &[]).expect_code(0, "first sync");
    fs::rename(
        fx.src.join("locked/moving.txt"),
        fx.src.join("open/moved.txt"),
    )
    .unwrap();
    let Some(guard) = Immutable::set(&fx.dst.join("locked")) else {
        eprintln!("note: the filesystem has no immutable attribute; test skipped");
        return;
    };
    let r = run(&fx, "sync", &[]);
    r.expect_code(3, "sync with an immutable replica directory");
    assert_no_temps(&fx.dst);
    assert_snapshots_mirror(
        &outside_of(b"locked", snapshot(&fx.src)),
        &outside_of(b"locked", snapshot(&fx.dst)),
        "everything outside the immutable directory should be mirrored",
    );
    drop(guard);
    sync_converges(&fx, "sync after chattr -i");
}

/// A file moved into the immutable directory: it cannot arrive, and the sync must not leave it
/// parked under a temporary name in the replica.
#[test]
fn file_moved_into_an_immutable_directory_leaves_no_temporary_behind() {
    let fx = Fixture::default();
    write(&fx.src.join("locked/stay.txt"), "stay");
    write(
        &fx.src.join("open/moving.txt"),
        "unique content that moves in",
    );
    run(&fx, "sync", &[]).expect_code(0, "first sync");
    fs::rename(
        fx.src.join("open/moving.txt"),
        fx.src.join("locked/moved.txt"),
    )
    .unwrap();
    let Some(guard) = Immutable::set(&fx.dst.join("locked")) else {
        eprintln!("note: the filesystem has no immutable attribute; test skipped");
        return;
    };
    let r = run(&fx, "sync", &[]);
    r.expect_code(3, "sync with an immutable replica directory");
    assert!(r.stderr.contains("locked/moved.txt"), "{}", r.stderr);
    assert_no_temps(&fx.dst);
    assert_snapshots_mirror(
        &outside_of(b"locked", snapshot(&fx.src)),
        &outside_of(b"locked", snapshot(&fx.dst)),
        "everything outside the immutable directory should be mirrored",
    );
    drop(guard);
    sync_converges(&fx, "sync after chattr -i");
}

// =============================================================================================
// 5. A source that changes during the sync
// =============================================================================================

/// One random change to the source, of many kinds; errors (a path that is not there right
/// now) are ignored.
fn churn(src: &Path, rng: &mut Rng) {
    let n = rng.below(24);
    let name = |rng: &mut Rng| src.join(format!("churn/c{}/f{:02}", rng.below(3), rng.below(24)));
    let big = |rng: &mut Rng| src.join(format!("big/b{}.bin", rng.below(4)));
    let _ = match rng.below(12) {
        0 | 1 => {
            let p = name(rng);
            let _ = fs::create_dir_all(p.parent().unwrap());
            fs::write(&p, bytes(rng.next(), rng.below(20_000) as usize))
        }
        2 => fs::OpenOptions::new()
            .append(true)
            .open(name(rng))
            .and_then(|mut f| f.write_all(&bytes(n, 3000))),
        3 => fs::OpenOptions::new()
            .write(true)
            .open(name(rng))
            .and_then(|f| f.set_len(rng.below(100))),
        4 => fs::remove_file(name(rng)),
        5 => {
            let (a, b) = (name(rng), name(rng));
            fs::rename(a, b)
        }
        6 => {
            let (a, b) = (rng.below(3), rng.below(3));
            fs::rename(
                src.join(format!("churn/c{a}")),
                src.join(format!("churn/c{b}/moved{n}")),
            )
            .or_else(|_| {
                fs::rename(
                    src.join(format!("churn/c{a}/moved{n}")),
                    src.join(format!("churn/c{b}")),
                )
            })
        }
        7 => {
            // A big file rewritten in place, slowly, so that a copy overlaps the writes.
            let p = big(rng);
            let seed = rng.next();
            fs::OpenOptions::new()
                .write(true)
                .open(p)
                .and_then(|mut f| {
                    for k in 0..8u64 {
                        f.write_all(&bytes(seed + k, 256 << 10))?;
                        thread::sleep(Duration::from_millis(1));
                    }
                    Ok(())
                })
        }
        8 => {
            let p = big(rng);
            let len = rng.below(3 << 20);
            fs::OpenOptions::new()
                .write(true)
                .open(p)
                .and_then(|f| f.set_len(len))
        }
        9 => {
            // Type changes: a file becomes a directory or a symlink, and back.
            let p = name(rng);
            match fs::symlink_metadata(&p) {
                Ok(m) if m.is_dir() => fs::remove_dir_all(&p),
                Ok(_) => fs::remove_file(&p).and_then(|_| {
                    if n.is_multiple_of(2) {
                        fs::create_dir(&p).and_then(|_| fs::write(p.join("inside"), b"x"))
                    } else {
                        std::os::unix::fs::symlink("elsewhere", &p)
                    }
                }),
                Err(_) => Ok(()),
            }
        }
        10 => fs::set_permissions(
            name(rng),
            fs::Permissions::from_mode(0o600 + (n as u32 % 2) * 0o44),
        ),
        _ => {
            let t = filetime::FileTime::from_unix_time(1_500_000_000 + n as i64, 0);
            filetime::set_symlink_file_times(name(rng), t, t)
        }
    };
}

#[test]
fn source_changing_during_syncs_never_breaks_a_sync_and_converges_after() {
    let fx = Fixture::default();
    make_tree(&fx.src, 300);
    for b in 0..4u64 {
        write(&fx.src.join(format!("big/b{b}.bin")), bytes(b, 2 << 20));
    }
    let mut rng = Rng(1);
    for _ in 0..200 {
        churn(&fx.src, &mut rng);
    }
    run(&fx, "sync", &[]).expect_code(0, "first sync");

    let stop = Arc::new(AtomicBool::new(false));
    let edits = Arc::new(AtomicU64::new(0));
    let writer = {
        let (src, stop, edits) = (fx.src.clone(), stop.clone(), edits.clone());
        thread::spawn(move || {
            let mut rng = Rng(2);
            while !stop.load(Ordering::Relaxed) {
                churn(&src, &mut rng);
                edits.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let mut codes: BTreeMap<i32, usize> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(8);
    let mut runs = 0;
    while Instant::now() < deadline || runs < 5 {
        let r = run(&fx, "sync", &[]);
        assert!(
            matches!(r.code, Some(0 | 3)),
            "a sync of a changing source must exit 0 or 3: {}",
            r.describe()
        );
        *codes.entry(r.code.unwrap()).or_default() += 1;
        runs += 1;
    }
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    eprintln!(
        "source changing: {runs} syncs during {} edits, exit codes {codes:?}",
        edits.load(Ordering::Relaxed)
    );
    sync_converges(&fx, "the sync after the writer stopped");
}

// =============================================================================================
// 6. Racy timestamps
// =============================================================================================

/// Rewrites `path` in place with other bytes of the same length, and puts back the atime and
/// mtime it had (utimensat), without waiting for the clock to tick.
fn same_size_rewrite_keeping_times(path: &Path) {
    let md = fs::symlink_metadata(path).unwrap();
    let mut data = fs::read(path).unwrap();
    assert!(!data.is_empty());
    for b in &mut data {
        *b = b.wrapping_add(1);
    }
    let mut f = fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all(&data).unwrap();
    drop(f);
    filetime::set_file_times(
        path,
        filetime::FileTime::from_last_access_time(&md),
        filetime::FileTime::from_last_modification_time(&md),
    )
    .unwrap();
    let after = fs::symlink_metadata(path).unwrap();
    assert_eq!(
        (after.len(), after.mtime(), after.mtime_nsec(), after.ino()),
        (md.len(), md.mtime(), md.mtime_nsec(), md.ino())
    );
}

#[test]
fn rewrite_right_after_a_sync_with_the_same_size_and_mtime_is_picked_up() {
    let fx = Fixture::default();
    let mut same_ctime = 0;
    for round in 0..25u64 {
        let f = fx.src.join(format!("f{}.bin", round % 3));
        // First modification, then a sync, then at once a second one that keeps size and mtime.
        write(&f, bytes(round, 100 + (round as usize % 3) * 1000));
        set_mtime(&f, 1_600_000_000, 5);
        run(&fx, "sync", &[]).expect_code(0, "first sync of the round");
        let ctime = ctime_ns(&f);
        same_size_rewrite_keeping_times(&f);
        if ctime_ns(&f) == ctime {
            same_ctime += 1;
        }
        run(&fx, "sync", &[]).expect_code(0, "sync after the rewrite");
        assert_eq!(
            fs::read(fx.dst.join(f.file_name().unwrap())).unwrap(),
            fs::read(&f).unwrap(),
            "round {round}: the rewrite right after the sync was missed"
        );
        assert_mirror(&fx.src, &fx.dst);
    }
    eprintln!("racy rewrite: the ctime did not change in {same_ctime} of 25 rounds");
}

#[test]
fn same_size_same_mtime_edit_inside_the_racy_window_after_a_sync_is_detected() {
    let fx = Fixture::default();
    write(&fx.src.join("f.txt"), "aaaaaaaaaaaaaaaa\n");
    write(&fx.src.join("g.txt"), "gggggggggggggggg\n");
    write(&fx.src.join("h.txt"), "hhhhhhhhhhhhhhhh\n");
    set_mtime(&fx.src.join("f.txt"), 1_600_000_000, 123);
    // Let the files age past the racy window, so that the hashes the sync records are trusted.
    thread::sleep(Duration::from_millis(2_100));
    run(&fx, "sync", &[]).expect_code(0, "first sync");
    run(&fx, "sync", &[]).expect_code(0, "second sync: the index holds trusted hashes now");

    // Inside the racy window of the sync that just finished: no clock tick is waited for.
    same_size_rewrite_keeping_times(&fx.src.join("f.txt"));
    let lines = fx.status_lines();
    assert_eq!(lines, ["M f.txt"], "status right after a same-size edit");
    run(&fx, "sync", &[]).expect_code(0, "sync after the edit");
    assert_mirror(&fx.src, &fx.dst);

    // Again, at once after that sync, and on the replica side too.
    same_size_rewrite_keeping_times(&fx.src.join("f.txt"));
    same_size_rewrite_keeping_times(&fx.dst.join("g.txt"));
    run(&fx, "sync", &[]).expect_code(0, "sync after the second edit");
    assert_mirror(&fx.src, &fx.dst);
    fx.assert_up_to_date();
}

/// The racy-clean rule itself, on the library level, where a filesystem whose clock did not
/// tick between two writes can be simulated: a cached hash whose fingerprint still matches but
/// was taken too close to the file's last change must not be reused.
#[test]
fn racily_clean_cached_hash_is_not_reused() {
    use dirsync::entry::{Content, Time};
    use dirsync::scan::{self, Side};

    let fx = Fixture::default();
    write(&fx.src.join("f.txt"), "original content");
    let mut tree = scan::walk(&fx.src, Side::Source);
    let all: Vec<usize> = tree.unhashed().collect();
    scan::hash_files(&fx.src, &mut tree, &all);
    let mut cached = tree.entries[1].1.clone();
    let old_hash = cached.file_hash().expect("hashed");

    // A same-size edit on a filesystem whose clock did not tick: the fingerprint stays as it
    // was, which is simulated by recording the new fingerprint with the old hash.
    fs::write(fx.src.join("f.txt"), "modified content").unwrap();
    let now = scan::walk(&fx.src, Side::Source);
    let fresh = now.entries[1].1.clone();
    let window = now.windows.for_entry(&fresh);
    assert!(window > 0);
    cached.fp = fresh.fp;
    let changed = cached.fp.changed_ns().expect("a POSIX stamp has times");
    let at = |ns: i128| Time {
        sec: (ns / 1_000_000_000) as i64,
        nsec: (ns % 1_000_000_000) as u32,
    };

    // Hashed within the racy window: must not be trusted.
    cached.seen = at(changed + window / 2);
    let mut e = fresh.clone();
    scan::reuse_cached(&mut e, &cached, window);
    assert!(
        matches!(e.content, Content::File { hash: None, .. }),
        "a racily clean cached hash was reused: {e:?}"
    );
    // Positive control: hashed well after the change, the same record is trusted.
    cached.seen = at(changed + window + 1_000_000);
    let mut e = fresh.clone();
    scan::reuse_cached(&mut e, &cached, window);
    assert_eq!(e.file_hash(), Some(old_hash));
}

// =============================================================================================
// 7. A hostile replica
// =============================================================================================

#[test]
fn replica_directory_swapped_for_a_symlink_never_lets_a_sync_write_outside() {
    let fx = Fixture::default();
    // The canary holds the same names as the replica subtree under attack.
    let outside = fx.root.join("outside");
    let canary = outside.join("canary");
    for name in ["a.txt", "b.txt", "inner/c.txt", "inner/d.txt", "file.txt"] {
        write(&canary.join(name), format!("canary {name}"));
        set_mode(&canary.join(name), 0o640);
        set_mtime(&canary.join(name), 1_234_567_890, 1);
    }
    symlink("a.txt", &canary.join("link"));
    set_mtime(&canary.join("inner"), 1_234_567_890, 2);
    set_mtime(&canary, 1_234_567_890, 3);
    let canary_before = snapshot(&outside);
    let canary_ctimes = ctimes(&outside);

    let s = &fx.src;
    for name in ["a.txt", "b.txt", "inner/c.txt", "inner/d.txt", "file.txt"] {
        write(&s.join("sub").join(name), format!("source {name}"));
    }
    write(&s.join("other.txt"), "other");
    run(&fx, "sync", &[]).expect_code(0, "first sync");

    let stop = Arc::new(AtomicBool::new(false));
    let swaps = Arc::new(AtomicU64::new(0));
    let attacker = {
        let (dst, root, canary, stop, swaps) = (
            fx.dst.clone(),
            fx.root.clone(),
            canary.clone(),
            stop.clone(),
            swaps.clone(),
        );
        thread::spawn(move || {
            let mut rng = Rng(3);
            let mut k = 0u64;
            while !stop.load(Ordering::Relaxed) {
                k += 1;
                // A directory or a file of the replica, replaced by a symlink to the canary.
                let (target, link_to) = match rng.below(3) {
                    0 => (dst.join("sub"), canary.clone()),
                    1 => (dst.join("sub/inner"), canary.join("inner")),
                    _ => (dst.join("sub/file.txt"), canary.join("file.txt")),
                };
                let away = root.join(format!("away-{k}"));
                if fs::rename(&target, &away).is_err() {
                    thread::yield_now();
                    continue;
                }
                if std::os::unix::fs::symlink(&link_to, &target).is_ok() {
                    swaps.fetch_add(1, Ordering::Relaxed);
                }
                thread::sleep(Duration::from_micros(rng.below(3000)));
                if fs::symlink_metadata(&target).is_ok_and(|m| m.file_type().is_symlink()) {
                    let _ = fs::remove_file(&target);
                }
                if fs::rename(&away, &target).is_err() {
                    let _ = fs::remove_dir_all(&away).or_else(|_| fs::remove_file(&away));
                }
                thread::sleep(Duration::from_micros(rng.below(500)));
            }
        })
    };

    let mut codes: BTreeMap<i32, usize> = BTreeMap::new();
    for round in 0..40u64 {
        // Changes to the attacked subtree each time.
        let sub = s.join("sub");
        write(&sub.join("a.txt"), format!("round {round}"));
        write(&sub.join(format!("inner/new{round}.txt")), "new");
        if round > 0 {
            let _ = fs::remove_file(sub.join(format!("inner/new{}.txt", round - 1)));
        }
        write(&sub.join("file.txt"), bytes(round, 100 + round as usize));
        set_mode(
            &sub.join("b.txt"),
            if round % 2 == 0 { 0o600 } else { 0o644 },
        );
        set_mtime(&sub.join("inner/c.txt"), 1_500_000_000 + round as i64, 0);
        if round % 3 == 0 {
            let _ = fs::rename(sub.join("inner/d.txt"), sub.join("inner/d2.txt"));
        } else {
            let _ = fs::rename(sub.join("inner/d2.txt"), sub.join("inner/d.txt"));
        }
        let r = run(&fx, "sync", &[]);
        assert!(
            matches!(r.code, Some(0 | 3)),
            "round {round}: a sync under attack must exit 0 or 3: {}",
            r.describe()
        );
        *codes.entry(r.code.unwrap()).or_default() += 1;
    }
    stop.store(true, Ordering::Relaxed);
    attacker.join().unwrap();
    eprintln!(
        "hostile replica: {} swaps during 40 syncs, exit codes {codes:?}",
        swaps.load(Ordering::Relaxed)
    );
    assert!(
        swaps.load(Ordering::Relaxed) >= 30,
        "precondition: the attack ran"
    );

    assert_unchanged(
        &canary_before,
        &snapshot(&outside),
        "the canary outside the replica",
    );
    assert_eq!(
        canary_ctimes,
        ctimes(&outside),
        "something was written to the canary (a ctime changed)"
    );
    // Whatever the attack left behind, the next sync repairs the replica.
    sync_converges(&fx, "the sync after the attack");
    assert_unchanged(
        &canary_before,
        &snapshot(&outside),
        "the canary outside the replica",
    );
}
