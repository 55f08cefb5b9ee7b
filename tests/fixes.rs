//! What a pass reports and how the binary behaves at its edges: summaries that count what was
//! done, root metadata, closed or full output streams, escaped names, signals and exit codes.
//! Each test names the defect it guards against.

mod common;

use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread::sleep;
use std::time::Duration;

use common::*;
use rustix::process::Signal;

/// Runs `dirsync ARGS` as `nobody` (`None` when not root or without `setpriv`).
fn as_nobody(fx: &Fixture, args: &[&std::ffi::OsStr]) -> Option<std::process::Output> {
    if !is_root() {
        return None;
    }
    fx.nobody_cmd().args(args).output().ok()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A mount that is undone when the test ends, even when it fails.
struct Mounted(std::path::PathBuf);

impl Mounted {
    /// Makes `dir` a read-only bind mount of itself; `None` when mounts are not allowed here.
    fn read_only(dir: &Path) -> Option<Mounted> {
        let ok = |args: &[&str]| {
            Command::new("mount")
                .args(args)
                .arg(dir)
                .arg(dir)
                .status()
                .is_ok_and(|s| s.success())
        };
        if !is_root() || !ok(&["--bind"]) {
            return None;
        }
        let m = Mounted(dir.to_path_buf());
        let ro = Command::new("mount")
            .args(["-o", "remount,bind,ro"])
            .arg(dir)
            .status()
            .is_ok_and(|s| s.success());
        ro.then_some(m)
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

// ---------------------------------------------------------------------------------------------
// Item 8: metadata of the root directory
// ---------------------------------------------------------------------------------------------

#[test]
fn root_directory_metadata_changes_are_shown_applied_and_counted() {
    let fx = Fixture::default();
    write(&fx.src.join("a"), "a");
    fx.sync().code(0);
    set_mode(&fx.src, 0o750);
    assert_eq!(fx.status_lines(), ["m ."]);
    let json = stdout_lines(&fx.run("status", &["--json"]).code(0)).join("\n");
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["summary"]["meta"], 1, "{json}");
    assert_eq!(v["changes"][0]["path"], ".", "{json}");
    let dry = fx.run("sync", &["-n"]).code(0);
    assert_eq!(stdout_lines(&dry), ["m ."]);
    let a = fx.run("sync", &["--json"]).code(0);
    assert_eq!(json_summary(&pass_json(&a)).metadata, 1);
    let mode = fs::metadata(&fx.dst).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o750);
    fx.assert_up_to_date();
    // An mtime alone is a change too.
    set_mtime(&fx.src, 1_000_000_000, 5);
    assert_eq!(fx.status_lines(), ["m ."]);
    fx.sync().code(0);
    assert_mirror(&fx.src, &fx.dst);
}

// ---------------------------------------------------------------------------------------------
// Item 11 and 21: the summary counts what was done
// ---------------------------------------------------------------------------------------------

#[test]
fn summary_counts_only_what_was_applied() {
    let fx = Fixture::default();
    mkdir(&fx.src.join("locked"));
    write(&fx.src.join("keep"), "k");
    fx.sync().code(0);
    write(&fx.src.join("locked/x"), "x");
    write(&fx.src.join("locked/y"), "y");
    write(&fx.src.join("open/z"), "z");
    let Some(_guard) = Immutable::set(&fx.dst.join("locked")) else {
        eprintln!("skipped: the filesystem has no immutable attribute");
        return;
    };
    let a = fx.run("sync", &["--json"]).code(3);
    let v = pass_json(&a);
    let s = json_summary(&v);
    // `open` and `open/z` were made; `locked/x` and `locked/y` could not be, nor could the
    // mtime of `locked` be set (its `m` change).
    assert_eq!((s.created, s.errors, s.not_made), (2, 3, 3), "{v}");
    assert_eq!(v["exit"], 3, "{v}");
    assert!(dst_has(&fx.dst, "open/z") && !dst_has(&fx.dst, "locked/x"));
}

fn dst_has(dst: &Path, rel: &str) -> bool {
    fs::symlink_metadata(dst.join(rel)).is_ok()
}

#[test]
fn an_interrupted_sync_counts_what_exists() {
    let fx = Fixture::default();
    for i in 0..6000 {
        write(&fx.src.join(format!("d{}/f{i}", i % 50)), bytes(i, 300));
    }
    let err = fx.root.join("err");
    let mut cmd = fx.std_cmd();
    cmd.arg("sync").arg(&fx.src).arg(&fx.dst);
    let mut bg = Background::spawn(cmd, &err);
    assert!(wait_until(Duration::from_secs(20), || dst_has(
        &fx.dst, "d0"
    )));
    bg.signal(Signal::INT);
    let st = bg.wait_timeout(Duration::from_secs(60)).expect("sync ends");
    assert_eq!(st.code(), Some(0), "{}", bg.stderr());
    let s = parse_summary(&bg.stderr());
    let files = snapshot(&fx.dst)
        .values()
        .filter(|n| n.kind == Kind::File)
        .count() as u64;
    let dirs = snapshot(&fx.dst)
        .values()
        .filter(|n| n.kind == Kind::Dir)
        .count() as u64;
    assert_eq!(
        s.created,
        files + dirs,
        "{files} files and {dirs} directories: {}",
        bg.stderr()
    );
    // 6,000 files, 50 directories and the root's metadata were planned.
    assert_eq!(s.created + s.not_made, 6051, "{}", bg.stderr());
}

#[test]
fn a_type_change_is_counted_as_one() {
    let fx = Fixture::default();
    write(&fx.src.join("t"), "file");
    fx.sync().code(0);
    fs::remove_file(fx.src.join("t")).unwrap();
    write(&fx.src.join("t/inner"), "x");
    let s = json_summary(&pass_json(&fx.run("sync", &["--json"]).code(0)));
    assert_eq!((s.type_changed, s.modified, s.created), (1, 0, 1));
    assert_mirror(&fx.src, &fx.dst);
}

// ---------------------------------------------------------------------------------------------
// Item 9: closed stderr
// ---------------------------------------------------------------------------------------------

#[test]
fn a_closed_stderr_does_not_crash_a_sync_or_damage_its_index() {
    let fx = Fixture::default();
    for i in 0..400 {
        write(&fx.src.join(format!("f{i}")), format!("{i}"));
    }
    let mut child = fx
        .std_cmd()
        .args(["sync", "-v"])
        .arg(&fx.src)
        .arg(&fx.dst)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Read one byte, then close the pipe, as `| head -c1` does.
    let mut pipe = child.stderr.take().unwrap();
    let _ = pipe.read(&mut [0u8; 1]);
    drop(pipe);
    let st = child.wait().unwrap();
    assert_eq!(st.code(), Some(0), "a closed stderr must not end the run");
    fx.assert_up_to_date();
    assert_mirror(&fx.src, &fx.dst);
}

// ---------------------------------------------------------------------------------------------
// Item 14 and 19, 21: status output
// ---------------------------------------------------------------------------------------------

#[test]
fn status_fails_when_its_output_cannot_be_written() {
    let fx = Fixture::default();
    write(&fx.src.join("a"), "a");
    let full = fs::OpenOptions::new().write(true).open("/dev/full");
    let Ok(full) = full else {
        eprintln!("skipped: no /dev/full");
        return;
    };
    let out = fx
        .std_cmd()
        .args(["status", "--json"])
        .arg(&fx.src)
        .arg(&fx.dst)
        .stdout(full)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("cannot write the output"));
    // A closed stdout: the shell's `>&-`.
    let st = Command::new("sh")
        .arg("-c")
        .arg("\"$0\" status \"$1\" \"$2\" >&-")
        .arg(dirsync_bin())
        .arg(&fx.src)
        .arg(&fx.dst)
        .env("XDG_STATE_HOME", &fx.state)
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert_eq!(st.code(), Some(1));
    // Redirected to /dev/null on purpose is fine.
    let st = fx
        .std_cmd()
        .arg("status")
        .arg(&fx.src)
        .arg(&fx.dst)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert_eq!(st.code(), Some(0));
}

#[test]
fn quiet_status_prints_nothing_when_up_to_date() {
    let fx = Fixture::default();
    write(&fx.src.join("a"), "a");
    fx.sync().code(0);
    let a = fx.run("status", &["-q"]).code(0);
    assert_eq!(stderr_of(&a), "");
    assert!(stdout_lines(&a).is_empty());
}

#[test]
fn status_with_unreadable_paths_does_not_claim_up_to_date() {
    let fx = Fixture::default();
    write(&fx.src.join("ok"), "ok");
    write(&fx.src.join("secret/x"), "x");
    chown_tree(&fx.root);
    set_mode(&fx.src.join("secret"), 0o000);
    let Some(first) = as_nobody(&fx, &["sync".as_ref(), fx.src.as_ref(), fx.dst.as_ref()]) else {
        eprintln!("skipped: needs root to drop to nobody");
        return;
    };
    assert_eq!(first.status.code(), Some(3), "{}", text(&first.stderr));
    let st = as_nobody(&fx, &["status".as_ref(), fx.src.as_ref(), fx.dst.as_ref()]).unwrap();
    assert_eq!(st.status.code(), Some(3));
    let err = text(&st.stderr);
    assert!(
        err.contains("except for 1 paths that could not be read"),
        "{err}"
    );
    assert!(!err.lines().any(|l| l == "up to date"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Item 15: names in messages are escaped
// ---------------------------------------------------------------------------------------------

#[test]
fn names_in_read_errors_cannot_forge_lines_or_send_escapes() {
    let fx = Fixture::default();
    let forged = "dir\nsynced: 0 created";
    let esc = "esc\x1b[31mred";
    write(&fx.src.join(forged).join("x"), "x");
    write(&fx.src.join(esc).join("y"), "y");
    chown_tree(&fx.root);
    set_mode(&fx.src.join(forged), 0o000);
    set_mode(&fx.src.join(esc), 0o000);
    let Some(out) = as_nobody(&fx, &["sync".as_ref(), fx.src.as_ref(), fx.dst.as_ref()]) else {
        eprintln!("skipped: needs root to drop to nobody");
        return;
    };
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("dir\\x0asynced: 0 created"), "{err}");
    assert!(err.contains("esc\\x1b[31mred"), "{err}");
    assert!(
        !err.contains('\x1b'),
        "a raw escape reached the terminal: {err:?}"
    );
    let summaries = err.lines().filter(|l| l.starts_with("synced: ")).count();
    assert_eq!(summaries, 1, "a file name forged a summary line: {err}");
}

// ---------------------------------------------------------------------------------------------
// Item 21: messages
// ---------------------------------------------------------------------------------------------

#[test]
fn every_problem_has_one_prefix() {
    let fx = Fixture::default();
    write(&fx.src.join("a"), "a");
    let fifo = fx.src.join("pipe");
    rustix::fs::mknodat(
        rustix::fs::CWD,
        &fifo,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o644),
        0,
    )
    .unwrap();
    let err = stderr_of(&fx.sync().code(0));
    assert!(err.contains("dirsync: warning: skipped pipe"), "{err}");
    assert!(!err.contains("[WARN") && !err.contains("[ERROR"), "{err}");
    fs::remove_file(&fifo).unwrap();
    let err = stderr_of(
        &fx.cmd()
            .args(["sync", "/nonexistent-src"])
            .arg(&fx.dst)
            .assert()
            .code(1),
    );
    assert!(err.starts_with("dirsync: error: "), "{err}");
}

#[test]
fn a_denied_replica_directory_reports_the_denial() {
    let fx = Fixture::default();
    write(&fx.src.join("theirs/a"), "a");
    fx.sync().code(0);
    chown_tree(&fx.root);
    // The replica directory belongs to root: nobody can neither write it nor chmod it.
    std::os::unix::fs::lchown(fx.dst.join("theirs"), Some(0), Some(0)).unwrap();
    set_mode(&fx.dst.join("theirs"), 0o755);
    write(&fx.src.join("theirs/b"), "b");
    chown_tree(&fx.src);
    let Some(out) = as_nobody(&fx, &["sync".as_ref(), fx.src.as_ref(), fx.dst.as_ref()]) else {
        eprintln!("skipped: needs root to drop to nobody");
        return;
    };
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    let copy = err
        .lines()
        .find(|l| l.contains("cannot copy theirs/b"))
        .unwrap_or_else(|| panic!("{err}"));
    assert!(copy.contains("Permission denied"), "{err}");
}

#[test]
fn files_below_a_directory_that_could_not_be_made_are_not_called_vanished() {
    let fx = Fixture::default();
    mkdir(&fx.src.join("top"));
    fx.sync().code(0);
    write(&fx.src.join("top/new/f1"), "1");
    write(&fx.src.join("top/new/f2"), "2");
    let Some(_guard) = Immutable::set(&fx.dst.join("top")) else {
        eprintln!("skipped: the filesystem has no immutable attribute");
        return;
    };
    let err = stderr_of(&fx.sync().code(3));
    assert!(!err.contains("vanished"), "{err}");
    assert!(err.contains("cannot create directory top/new"), "{err}");
    assert!(
        err.contains(
            "cannot create top/new/f1 in the replica: its directory top/new could not be created"
        ),
        "{err}"
    );
}

#[test]
fn a_read_only_replica_filesystem_stops_the_run_with_one_message() {
    let fx = Fixture::default();
    write(&fx.src.join("a"), "a");
    fx.sync().code(0);
    for i in 0..40 {
        write(&fx.src.join(format!("n/f{i}")), format!("{i}"));
        write(&fx.src.join(format!("g{i}")), format!("{i}"));
    }
    let Some(_ro) = Mounted::read_only(&fx.dst) else {
        eprintln!("skipped: needs root for a read-only bind mount");
        return;
    };
    let err = stderr_of(&fx.sync().code(3));
    let errors = err
        .lines()
        .filter(|l| l.starts_with("dirsync: error:"))
        .count();
    assert_eq!(errors, 1, "{err}");
    assert!(err.contains("read-only"), "{err}");
    let s = parse_summary(&err);
    assert_eq!(s.created, 0, "{err}");
    assert!(s.not_made >= 81, "{err}");
}

// ---------------------------------------------------------------------------------------------
// Item 16: signals and the exit-code table of README.md
// ---------------------------------------------------------------------------------------------

/// A source and replica whose first sync must hash two 1 GiB sparse files (same size, one byte
/// apart) before it can plan: the scan phase takes long enough to receive two signals.
fn slow_scan_fixture() -> Fixture {
    let fx = Fixture::default();
    let size = 1u64 << 30;
    for (root, last) in [(&fx.src, b'a'), (&fx.dst, b'b')] {
        mkdir(root);
        let f = fs::File::create(root.join("big")).unwrap();
        f.set_len(size).unwrap();
        use std::os::unix::fs::FileExt;
        f.write_all_at(&[last], size - 1).unwrap();
    }
    fx
}

fn run_with_signals(fx: &Fixture, sub: &str, signals: &[Signal]) -> std::process::ExitStatus {
    let mut cmd = fx.std_cmd();
    cmd.arg(sub).arg(&fx.src).arg(&fx.dst);
    if sub == "watch" {
        cmd.args(["--interval", "10s"]);
    }
    let mut bg = Background::spawn(cmd, &fx.root.join(format!("{sub}.err")));
    sleep(Duration::from_millis(150));
    for &s in signals {
        bg.signal(s);
        sleep(Duration::from_millis(30));
    }
    bg.wait_timeout(Duration::from_secs(60))
        .expect("dirsync ends")
}

#[test]
fn a_second_signal_exits_at_once_with_128_plus_its_number() {
    for (sig, code) in [(Signal::TERM, 143), (Signal::INT, 130), (Signal::HUP, 129)] {
        let fx = slow_scan_fixture();
        let st = run_with_signals(&fx, "sync", &[sig, sig]);
        assert_eq!(st.code(), Some(code), "{sig:?}");
        // The next sync takes over (repairing the index the abrupt exit left open) and finishes.
        fx.sync().code(0);
        assert_mirror(&fx.src, &fx.dst);
    }
}

#[test]
fn a_first_signal_stops_cleanly_with_exit_0() {
    for sig in [Signal::TERM, Signal::INT, Signal::HUP] {
        let fx = slow_scan_fixture();
        let st = run_with_signals(&fx, "sync", &[sig]);
        assert_eq!(st.code(), Some(0), "{sig:?}");
    }
}

/// Whether process `pid` has a handler for `sig` (`SigCgt` in `/proc/PID/status`).
fn catches(pid: u32, sig: i32) -> bool {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("SigCgt:"))
        .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
        .is_some_and(|mask| mask & (1 << (sig - 1)) != 0)
}

/// The handlers are the first thing the process sets up: from the moment it catches SIGTERM
/// (before it has parsed its arguments, opened the index or read a tree), a signal stops it
/// cleanly with exit 0, never the default action's 143.
#[test]
fn a_signal_right_after_start_stops_cleanly() {
    let fx = Fixture::default();
    write(&fx.src.join("a"), "a");
    for _ in 0..5 {
        let mut child = fx
            .std_cmd()
            .arg("watch")
            .arg(&fx.src)
            .arg(&fx.dst)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let pid = child.id();
        assert!(
            wait_until(Duration::from_secs(10), || catches(pid, 15)),
            "the process never caught SIGTERM"
        );
        rustix::process::kill_process(rustix::process::Pid::from_child(&child), Signal::TERM)
            .unwrap();
        let st = child.wait().unwrap();
        assert_eq!(st.code(), Some(0), "{st}");
    }
}

/// Every row of the README's exit-code table, each produced for real.
#[test]
fn the_readme_exit_code_table_is_what_the_binary_does() {
    let readme = fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let table = readme
        .split("## Exit codes")
        .nth(1)
        .expect("README has an exit-code section");
    let documented: Vec<String> = table
        .lines()
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .filter_map(|l| l.split('|').nth(1).map(|c| c.trim().to_string()))
        .filter(|c| {
            c.chars()
                .all(|ch| ch.is_ascii_digit() || ch == ',' || ch == ' ')
        })
        .filter(|c| !c.is_empty())
        .collect();
    assert_eq!(documented, ["0", "1", "2", "3", "129, 130, 143"], "{table}");

    // 0: success, and a run stopped by a signal.
    let fx = Fixture::default();
    write(&fx.src.join("a"), "a");
    fx.sync().code(0);
    // 1: bad input, nothing changed.
    fx.cmd()
        .args(["sync", "/nonexistent-src"])
        .arg(&fx.dst)
        .assert()
        .code(1);
    // 1: a guard rail.
    let empty = Fixture::default();
    write(&empty.dst.join("x"), "x");
    empty.sync().code(1);
    // 1: the replica in use by another dirsync.
    let mut cmd = fx.std_cmd();
    cmd.args(["watch", "--interval", "10s"])
        .arg(&fx.src)
        .arg(&fx.dst);
    let mut bg = Background::spawn(cmd, &fx.root.join("w.err"));
    sleep(Duration::from_millis(300));
    fx.sync().code(1);
    bg.signal(Signal::TERM);
    assert_eq!(
        bg.wait_timeout(Duration::from_secs(20)).unwrap().code(),
        Some(0)
    );
    // 2: usage.
    fx.cmd().args(["sync", "--no-such-flag"]).assert().code(2);
    // 3: partial.
    mkdir(&fx.src.join("locked"));
    fx.sync().code(0);
    write(&fx.src.join("locked/new"), "n");
    if let Some(_g) = Immutable::set(&fx.dst.join("locked")) {
        fx.sync().code(3);
    }
    // 3: verify found a difference.
    fs::write(fx.dst.join("a"), "b").unwrap();
    set_mtime(&fx.dst.join("a"), 0, 0);
    let v = fx.run("verify", &[]).get_output().status.code();
    assert_eq!(v, Some(3));
    // 129, 130, 143: a second signal (see `a_second_signal_exits_at_once_with_128_plus_its_number`).
}

// ---------------------------------------------------------------------------------------------
// Item 6: a replica filesystem that keeps whole seconds
// ---------------------------------------------------------------------------------------------

/// An ext4 image made with 128-byte inodes (whole-second timestamps), loop-mounted for as long
/// as it lives.
struct CoarseDisk {
    mount: std::path::PathBuf,
}

impl CoarseDisk {
    fn new(root: &Path) -> Option<CoarseDisk> {
        if !is_root() {
            return None;
        }
        let img = root.join("coarse.img");
        let mount = root.join("coarse");
        mkdir(&mount);
        fs::File::create(&img).unwrap().set_len(64 << 20).unwrap();
        let made = Command::new("mkfs.ext4")
            .args(["-q", "-F", "-I", "128"])
            .arg(&img)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        let mounted = made
            && Command::new("mount")
                .args(["-o", "loop"])
                .arg(&img)
                .arg(&mount)
                .status()
                .is_ok_and(|s| s.success());
        mounted.then_some(CoarseDisk { mount })
    }
}

impl Drop for CoarseDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mount).status();
    }
}

#[test]
fn a_replica_that_keeps_whole_seconds_settles_after_one_sync() {
    let fx = Fixture::default();
    let Some(disk) = CoarseDisk::new(&fx.root) else {
        eprintln!("skipped: needs root, mkfs.ext4 and a loop device");
        return;
    };
    let dst = disk.mount.join("d");
    write(&fx.src.join("a"), "a");
    write(&fx.src.join("sub/b"), "b");
    symlink("a", &fx.src.join("l"));
    set_mtime(&fx.src.join("a"), 981_173_106, 123_000_000);
    set_mtime(&fx.src.join("sub/b"), 981_173_107, 999_999_999);
    set_mtime(&fx.src.join("sub"), 981_173_108, 5);
    let run = |sub: &str| fx.cmd().arg(sub).arg(&fx.src).arg(&dst).assert();
    let first = parse_summary(&stderr_of(&run("sync").code(0)));
    assert_eq!(first.created, 4);
    let st = fs::symlink_metadata(dst.join("a")).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        (st.mtime(), st.mtime_nsec()),
        (981_173_106, 0),
        "not a coarse filesystem"
    );
    for _ in 0..2 {
        let err = stderr_of(
            &fx.cmd()
                .args(["sync", "-v"])
                .arg(&fx.src)
                .arg(&dst)
                .assert()
                .code(0),
        );
        let s = parse_summary(&err);
        assert_eq!(s, Summary::default(), "a second sync is not a no-op: {err}");
        let a = run("status").code(0);
        assert!(stdout_lines(&a).is_empty(), "{:?}", stdout_lines(&a));
    }
    // A real change is still seen: a new mtime in another second.
    set_mtime(&fx.src.join("a"), 981_173_200, 0);
    assert_eq!(stdout_lines(&run("status").code(0)), ["m a"]);
}

/// `watch` stopped by a signal exits as the state it leaves: 3 while its last pass had
/// failures, 0 once a later pass fixed them.
#[test]
fn watch_exits_with_the_state_of_its_last_pass() {
    let fx = Fixture::default();
    mkdir(&fx.src.join("locked"));
    write(&fx.src.join("a"), "a");
    fx.sync().code(0);
    write(&fx.src.join("locked/new"), "n");
    let Some(guard) = Immutable::set(&fx.dst.join("locked")) else {
        eprintln!("skipped: the filesystem has no immutable attribute");
        return;
    };
    let watch = |until: &dyn Fn(&str) -> bool| {
        let mut cmd = fx.std_cmd();
        cmd.args(["watch", "--interval", "200ms"])
            .arg(&fx.src)
            .arg(&fx.dst);
        let err = fx.root.join("watch.err");
        let mut bg = Background::spawn(cmd, &err);
        assert!(wait_until(Duration::from_secs(20), || until(&bg.stderr())));
        bg.signal(Signal::TERM);
        let st = bg
            .wait_timeout(Duration::from_secs(20))
            .expect("watch ends");
        (st.code(), bg.stderr())
    };
    let (code, err) = watch(&|e| e.contains("cannot copy locked/new"));
    assert_eq!(code, Some(3), "{err}");
    drop(guard);
    let (code, err) = watch(&|e| e.contains("synced: 1 created"));
    assert_eq!(code, Some(0), "{err}");
    assert_mirror(&fx.src, &fx.dst);
}

// ---------------------------------------------------------------------------------------------
// Found by trying the fixed binary as a hostile user
// ---------------------------------------------------------------------------------------------

/// A bind mount of `what` at `at`, undone when the test ends.
struct Bind(std::path::PathBuf);

impl Bind {
    fn new(what: &Path, at: &Path) -> Option<Bind> {
        let ok = is_root()
            && Command::new("mount")
                .arg("--bind")
                .arg(what)
                .arg(at)
                .status()
                .is_ok_and(|s| s.success());
        ok.then(|| Bind(at.to_path_buf()))
    }
}

impl Drop for Bind {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_filesystem_mounted_inside_the_replica_is_never_entered_or_emptied() {
    let fx = Fixture::default();
    write(&fx.src.join("p"), "precious");
    write(&fx.src.join("sub/s"), "s");
    fx.sync().code(0);
    let other = fx.root.join("other");
    write(&other.join("o"), "o");
    mkdir(&fx.dst.join("mnt"));
    mkdir(&fx.dst.join("m2"));
    let Some(_src_bind) = Bind::new(&fx.src, &fx.dst.join("mnt")) else {
        eprintln!("skipped: needs root for bind mounts");
        return;
    };
    let _other_bind = Bind::new(&other, &fx.dst.join("m2")).unwrap();
    let (src_before, other_before) = (snapshot(&fx.src), snapshot(&other));
    for _ in 0..2 {
        let a = fx.sync().code(3);
        let err = stderr_of(&a);
        assert!(err.contains("mounted here inside the replica"), "{err}");
        assert_unchanged(
            &src_before,
            &snapshot(&fx.src),
            "the source, mounted in the replica",
        );
        assert_unchanged(
            &other_before,
            &snapshot(&other),
            "a filesystem mounted in the replica",
        );
    }
    let lines = stdout_lines(&fx.status().code(3));
    assert!(
        lines
            .iter()
            .all(|l| !l.contains("mnt") && !l.contains("m2")),
        "{lines:?}"
    );
}

#[test]
fn an_edit_within_the_same_second_on_a_coarse_source_is_seen() {
    let fx = Fixture::default();
    let Some(disk) = CoarseDisk::new(&fx.root) else {
        eprintln!("skipped: needs root, mkfs.ext4 and a loop device");
        return;
    };
    let src = disk.mount.join("src");
    let run = || fx.cmd().arg("sync").arg(&src).arg(&fx.dst).assert().code(0);
    for round in 0..10u8 {
        let a = [b'a' + round; 4];
        let b = [b'A' + round; 4];
        write(&src.join("f"), a);
        run();
        write(&src.join("f"), b);
        run();
        assert_eq!(
            fs::read(fx.dst.join("f")).unwrap(),
            b,
            "round {round}: the edit was missed"
        );
    }
}

#[test]
fn status_after_a_killed_sync_plans_without_the_index() {
    let fx = Fixture::default();
    for i in 0..50 {
        write(&fx.src.join(format!("f{i}")), format!("{i}"));
    }
    let st = fx
        .std_cmd()
        .arg("sync")
        .arg(&fx.src)
        .arg(&fx.dst)
        .env("DIRSYNC_FAULT_KILL_AFTER", "10")
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert_eq!(st.code(), None, "the fault hook kills the sync");
    let a = fx.status().code(0);
    assert!(
        stderr_of(&a).contains("needs a repair"),
        "{}",
        stderr_of(&a)
    );
    assert!(
        !stdout_lines(&a).is_empty(),
        "the rest of the sync is still to do"
    );
    fx.run("sync", &["-n"]).code(0);
    fx.sync().code(0);
    fx.assert_up_to_date();
    assert_mirror(&fx.src, &fx.dst);
}

#[test]
fn a_full_index_filesystem_is_not_blamed_on_the_replica() {
    let fx = Fixture::default();
    for i in 0..3000 {
        write(&fx.src.join(format!("d{}/f{i}", i % 30)), format!("{i}"));
    }
    let state = fx.root.join("tiny-state");
    mkdir(&state);
    let mounted = is_root()
        && Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=600k", "tmpfs"])
            .arg(&state)
            .status()
            .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("skipped: needs root for a small tmpfs");
        return;
    }
    let _m = Mounted(state.clone());
    let out = Command::new(dirsync_bin())
        .arg("sync")
        .arg(&fx.src)
        .arg(&fx.dst)
        .env("XDG_STATE_HOME", &state)
        .output()
        .unwrap();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("(the index's filesystem is full)"), "{err}");
    assert!(!err.contains("the replica's filesystem is full"), "{err}");
}

#[test]
fn a_watch_says_a_repeated_failure_once() {
    let fx = Fixture::default();
    mkdir(&fx.src.join("locked"));
    fx.sync().code(0);
    write(&fx.src.join("locked/new"), "n");
    let Some(_guard) = Immutable::set(&fx.dst.join("locked")) else {
        eprintln!("skipped: the filesystem has no immutable attribute");
        return;
    };
    let mut cmd = fx.std_cmd();
    cmd.args(["watch", "--interval", "100ms"])
        .arg(&fx.src)
        .arg(&fx.dst);
    let mut bg = Background::spawn(cmd, &fx.root.join("watch.err"));
    sleep(Duration::from_millis(1500));
    bg.signal(Signal::TERM);
    bg.wait_timeout(Duration::from_secs(20))
        .expect("watch ends");
    let err = bg.stderr();
    let copies = err.matches("cannot copy locked/new").count();
    assert_eq!(copies, 1, "{err}");
    // One summary of the failing pass; the pass SIGTERM interrupted may add its own.
    assert_eq!(err.matches("2 errors in").count(), 1, "{err}");
}

#[test]
fn the_replica_shown_inside_the_source_by_a_mount_is_not_copied_into_itself() {
    let fx = Fixture::default();
    write(&fx.src.join("a"), "a");
    fx.sync().code(0);
    mkdir(&fx.src.join("m"));
    let Some(_b) = Bind::new(&fx.dst, &fx.src.join("m")) else {
        eprintln!("skipped: needs root for bind mounts");
        return;
    };
    for _ in 0..3 {
        let err = stderr_of(&fx.sync().code(3));
        assert!(err.contains("this is the replica"), "{err}");
    }
    assert!(
        !fx.dst.join("m/m").exists(),
        "the replica was copied into itself"
    );
    assert!(
        !fx.dst.join("m/a").exists(),
        "the replica was copied into itself"
    );
}

#[test]
fn intervals_are_at_most_a_week() {
    let fx = Fixture::default();
    for bad in ["8days", "300000000000y", "18446744073709551615s"] {
        let a = fx.run("watch", &["--interval", bad]).code(2);
        assert!(
            stderr_of(&a).contains("interval"),
            "{bad}: {}",
            stderr_of(&a)
        );
    }
}

/// The roots are used as they were checked: a directory swapped in at SRC or DST between the
/// checks and the pass (here, a directory inside the replica moved to SRC's path) is refused.
#[test]
fn roots_swapped_after_their_checks_are_refused() {
    use dirsync::sync::{self as dsync, Session};
    use std::sync::atomic::AtomicBool;

    let fx = Fixture::default();
    write(&fx.src.join("a"), "a");
    write(&fx.dst.join("inner/i"), "i");
    let cfg = fx.config();
    let before = snapshot(&fx.dst);
    fs::rename(&fx.src, fx.root.join("src.old")).unwrap();
    fs::rename(fx.dst.join("inner"), &fx.src).unwrap();
    let stop = AtomicBool::new(false);
    let mut session = Session::open(&cfg).unwrap();
    let err = session.sync(&stop).unwrap_err().to_string();
    assert!(
        err.contains("another directory than the one checked"),
        "{err}"
    );
    assert!(
        dsync::status(&cfg).is_err(),
        "status scanned the swapped source"
    );
    drop(session);
    fs::rename(&fx.src, fx.dst.join("inner")).unwrap();
    assert_unchanged(&before, &snapshot(&fx.dst), "the replica");
    // The replica swapped: another directory at DST's path.
    fs::rename(fx.root.join("src.old"), &fx.src).unwrap();
    fs::rename(&fx.dst, fx.root.join("dst.old")).unwrap();
    mkdir(&fx.dst);
    let err = Session::open(&cfg).err().expect("refused").to_string();
    assert!(
        err.contains("another directory than the one checked"),
        "{err}"
    );
}

#[test]
fn verify_dry_run_needs_repair() {
    let fx = Fixture::default();
    write(&fx.src.join("a"), "a");
    fx.sync().code(0);
    let a = fx.run("verify", &["--dry-run"]).code(2);
    assert!(stderr_of(&a).contains("--repair"), "{}", stderr_of(&a));
    fx.run("verify", &["--repair", "--dry-run"]).code(0);
}
