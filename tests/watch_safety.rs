//! `watch` and `sync` against roots that change under them: a replica replaced by a symlink, a
//! source that vanishes or is replaced, a retargeted source link, a second process on the same
//! replica; and what a long-running watch prints.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::thread::sleep;
use std::time::{Duration, Instant};

use common::*;
use rustix::process::Signal;

/// Starts `watch SRC DST ARGS...` with stderr captured.
fn watch(fx: &Fixture, src: &Path, args: &[&str]) -> Background {
    let mut cmd = fx.std_cmd();
    cmd.arg("watch").arg(src).arg(&fx.dst).args(args);
    Background::spawn(cmd, &fx.root.join("watch.stderr"))
}

#[track_caller]
fn wait_mirror(w: &Background, src: &Path, dst: &Path, what: &str) {
    assert!(
        wait_until(Duration::from_secs(15), || is_mirror(src, dst)),
        "{what}: {} never mirrored {}; stderr:\n{}",
        dst.display(),
        src.display(),
        w.stderr()
    );
}

#[track_caller]
fn wait_stderr(w: &Background, needle: &str) {
    assert!(
        wait_until(Duration::from_secs(10), || w.stderr().contains(needle)),
        "no {needle:?} on stderr:\n{}",
        w.stderr()
    );
}

#[track_caller]
fn stop(mut w: Background) -> i32 {
    w.signal(Signal::TERM);
    let st = w
        .wait_timeout(Duration::from_secs(10))
        .expect("watch stops on SIGTERM");
    st.code().unwrap_or_else(|| panic!("watch killed: {st}"))
}

fn summary_lines(text: &str) -> usize {
    text.lines().filter(|l| l.contains("synced:")).count()
}

// ---------------------------------------------------------------------------------------------
// Item 2: the replica root is held, never followed
// ---------------------------------------------------------------------------------------------

#[test]
fn watch_never_follows_a_replica_replaced_by_a_symlink() {
    let fx = Fixture::default();
    write(&fx.src.join("a"), "a\n");
    let victim = fx.root.join("victim");
    write(&victim.join("keep"), "keep\n");
    let before = snapshot(&victim);
    let victim_ctimes = ctimes(&victim);
    let w = watch(&fx, &fx.src, &["--interval", "300ms"]);
    wait_mirror(&w, &fx.src, &fx.dst, "first pass");

    let old = fx.root.join("dst.old");
    let link = fx.root.join("t");
    symlink(&victim, &link);
    fs::rename(&fx.dst, &old).unwrap();
    fs::rename(&link, &fx.dst).unwrap();
    write(&fx.src.join("b"), "b\n");
    wait_stderr(&w, "no longer names the directory being watched");
    sleep(Duration::from_millis(1000));
    assert_unchanged(&before, &snapshot(&victim), "the symlink's target");
    assert_eq!(
        ctimes(&victim),
        victim_ctimes,
        "something was written in victim"
    );
    assert!(!old.join("b").exists(), "a paused watch synced anyway");
    let err = w.stderr();
    assert_eq!(
        err.matches("no longer names the directory").count(),
        1,
        "the pause is reported once:\n{err}"
    );

    // Put the directory back: the watch resumes into it.
    fs::remove_file(&fx.dst).unwrap();
    fs::rename(&old, &fx.dst).unwrap();
    wait_mirror(&w, &fx.src, &fx.dst, "after the replica came back");
    assert_unchanged(&before, &snapshot(&victim), "the symlink's target");
    stop(w);
}

/// A pass that runs beneath the held root after the replica path was swapped for a symlink
/// (no pause check in between): the walk, the hashing, the writes and `verify` all stay in the
/// directory that was opened, and nothing happens in the symlink's target.
#[test]
fn a_session_works_beneath_the_held_replica_root() {
    use dirsync::sync::Session;

    let fx = Fixture::default();
    write(&fx.src.join("a"), "a\n");
    write(&fx.src.join("same-size"), "1234\n");
    mkdir(&fx.dst);
    let victim = fx.root.join("victim");
    write(&victim.join("keep"), "keep\n");
    write(&victim.join("a"), "not a\n");
    write(&victim.join("same-size"), "abcd\n");
    let victim_before = snapshot(&victim);
    let cfg = fx.config();
    let stop = AtomicBool::new(false);
    let mut session = Session::open(&cfg).unwrap();
    let old = fx.root.join("dst.old");
    fs::rename(&fx.dst, &old).unwrap();
    symlink(&victim, &fx.dst);

    let report = session.sync(&stop).unwrap();
    assert_eq!(report.error_count(), 0, "{:?}", report.scan_errors);
    assert_mirror(&fx.src, &old);
    assert_unchanged(&victim_before, &snapshot(&victim), "the symlink's target");

    // `verify` opens the replica root itself, by its resolved path: a symlink there is refused.
    let v = dirsync::verify::verify(&cfg, dirsync::verify::Repair::Yes, &stop);
    assert!(v.is_err(), "verify went through the symlink");
    assert_unchanged(&victim_before, &snapshot(&victim), "the symlink's target");
}

// ---------------------------------------------------------------------------------------------
// Item 3: a missing or replaced source pauses the watch
// ---------------------------------------------------------------------------------------------

#[test]
fn watch_pauses_while_the_source_is_gone_whatever_the_flags() {
    for flags in [&[][..], &["--allow-empty-source"][..]] {
        let fx = Fixture::default();
        make_tree(&fx.src, 10);
        let mut args = vec!["--interval", "200ms"];
        args.extend_from_slice(flags);
        let mut w = watch(&fx, &fx.src, &args);
        wait_mirror(&w, &fx.src, &fx.dst, "first pass");
        let before = snapshot(&fx.dst);

        let gone = fx.root.join("src.gone");
        fs::rename(&fx.src, &gone).unwrap();
        wait_stderr(&w, "paused, resuming when it is back");
        sleep(Duration::from_millis(1000));
        assert!(w.try_status().is_none(), "watch exited:\n{}", w.stderr());
        assert_unchanged(
            &before,
            &snapshot(&fx.dst),
            "the replica of a vanished source",
        );
        let err = w.stderr();
        assert_eq!(
            err.matches("paused").count(),
            1,
            "{flags:?}: reported once:\n{err}"
        );
        assert!(
            !err.contains("is empty"),
            "{flags:?}: a missing source is not empty:\n{err}"
        );

        fs::rename(&gone, &fx.src).unwrap();
        write(&fx.src.join("back.txt"), "back\n");
        wait_mirror(&w, &fx.src, &fx.dst, "after the source came back");
        stop(w);
    }
}

#[test]
fn watch_pauses_when_the_source_root_is_replaced_by_another_directory() {
    let fx = Fixture::default();
    make_tree(&fx.src, 10);
    let w = watch(
        &fx,
        &fx.src,
        &["--interval", "200ms", "--allow-empty-source"],
    );
    wait_mirror(&w, &fx.src, &fx.dst, "first pass");
    let before = snapshot(&fx.dst);

    // An unmounted disk leaves its mount point: an empty directory at the same path.
    let away = fx.root.join("src.away");
    fs::rename(&fx.src, &away).unwrap();
    mkdir(&fx.src);
    write(&fx.src.join("stray"), "not the source\n");
    wait_stderr(&w, "replaced");
    sleep(Duration::from_millis(1000));
    assert_unchanged(
        &before,
        &snapshot(&fx.dst),
        "the replica of a replaced source",
    );
    assert_eq!(w.stderr().matches("paused").count(), 1, "{}", w.stderr());

    // The disk is back.
    fs::remove_dir_all(&fx.src).unwrap();
    fs::rename(&away, &fx.src).unwrap();
    write(&fx.src.join("back.txt"), "back\n");
    wait_mirror(&w, &fx.src, &fx.dst, "after the source came back");
    stop(w);
}

// ---------------------------------------------------------------------------------------------
// Item 17: a symlinked SRC is followed at each pass
// ---------------------------------------------------------------------------------------------

/// Points `link` at `target` atomically, as `ln -sfn` does.
fn retarget(link: &Path, target: &Path) {
    let tmp = link.with_extension("new");
    symlink(target, &tmp);
    fs::rename(&tmp, link).unwrap();
}

#[test]
fn watch_follows_a_retargeted_source_link() {
    let fx = Fixture::default();
    let (r1, r2) = (fx.root.join("r1"), fx.root.join("r2"));
    make_tree(&r1, 10);
    make_tree(&r2, 12);
    write(&r2.join("only-in-r2"), "new release\n");
    let current = fx.root.join("current");
    symlink("r1", &current);
    let mut w = watch(&fx, &current, &["--interval", "200ms"]);
    wait_mirror(&w, &r1, &fx.dst, "first pass");

    retarget(&current, Path::new("r2"));
    wait_mirror(&w, &r2, &fx.dst, "after the link moved to r2");
    // A change in the new target is picked up too; r1 is not looked at any more.
    write(&r2.join("later"), "later\n");
    write(&r1.join("ignored"), "old release\n");
    wait_mirror(&w, &r2, &fx.dst, "after a change in r2");
    assert!(w.try_status().is_none(), "watch exited:\n{}", w.stderr());
    assert_eq!(stop(w), 0);
}

/// A retargeted link is a new source, not a replaced one: no pause, whatever the targets' inodes.
#[test]
fn a_retargeted_source_link_is_not_a_pause() {
    let fx = Fixture::default();
    let (r1, r2) = (fx.root.join("r1"), fx.root.join("r2"));
    write(&r1.join("f"), "1\n");
    write(&r2.join("f"), "2\n");
    let current = fx.root.join("current");
    symlink(&r1, &current);
    let w = watch(&fx, &current, &["--interval", "200ms"]);
    wait_mirror(&w, &r1, &fx.dst, "first pass");
    retarget(&current, &r2);
    wait_mirror(&w, &r2, &fx.dst, "after the link moved");
    assert!(!w.stderr().contains("paused"), "{}", w.stderr());
    stop(w);
}

// ---------------------------------------------------------------------------------------------
// Item 21: one process per replica, whatever the index
// ---------------------------------------------------------------------------------------------

#[test]
fn a_second_sync_with_another_index_is_refused_while_a_watch_holds_the_replica() {
    let fx = Fixture::default();
    make_tree(&fx.src, 10);
    let w = watch(&fx, &fx.src, &["--interval", "10s"]);
    wait_mirror(&w, &fx.src, &fx.dst, "first pass");
    // A change that a second sync would apply.
    write(&fx.src.join("new.txt"), "new\n");
    let before = snapshot(&fx.dst);
    let other = fx.root.join("other.redb");
    for cmd in ["sync", "watch"] {
        let started = Instant::now();
        let a = fx
            .cmd()
            .arg(cmd)
            .arg(&fx.src)
            .arg(&fx.dst)
            .arg("--index")
            .arg(&other)
            .assert()
            .code(1);
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{cmd} did not fail fast"
        );
        let err = stderr_of(&a);
        assert!(
            err.contains(&fx.dst.display().to_string()) && err.contains("another dirsync"),
            "{cmd}: the message should name the replica and the other process: {err:?}"
        );
        assert_unchanged(&before, &snapshot(&fx.dst), "a refused second process");
    }
    // status only reads: it runs alongside.
    fx.cmd()
        .arg("status")
        .arg(&fx.src)
        .arg(&fx.dst)
        .arg("--index")
        .arg(&other)
        .assert()
        .code(0);
    assert_eq!(stop(w), 0);
    // Once the watch is gone, the replica is free again.
    fx.cmd()
        .arg("sync")
        .arg(&fx.src)
        .arg(&fx.dst)
        .arg("--index")
        .arg(&other)
        .assert()
        .code(0);
    assert_mirror(&fx.src, &fx.dst);
}

// ---------------------------------------------------------------------------------------------
// Item 10: no busy loop
// ---------------------------------------------------------------------------------------------

#[test]
fn intervals_below_100ms_are_refused() {
    let fx = Fixture::default();
    write(&fx.src.join("a"), "a\n");
    for interval in ["0", "0s", "1ns", "99ms"] {
        let a = fx.run("watch", &["--interval", interval]).code(2);
        let err = stderr_of(&a);
        assert!(
            err.contains("too short") && err.contains("at least 100ms"),
            "--interval {interval}: {err:?}"
        );
    }
    assert!(!fx.dst.exists(), "a refused watch created the replica");
    // 100ms is allowed.
    let w = watch(&fx, &fx.src, &["--interval", "100ms"]);
    wait_mirror(&w, &fx.src, &fx.dst, "--interval 100ms");
    assert_eq!(stop(w), 0);
}

// ---------------------------------------------------------------------------------------------
// Item 20: idle passes are silent
// ---------------------------------------------------------------------------------------------

#[test]
fn an_idle_watch_writes_no_summary_lines_and_a_changed_pass_does() {
    let fx = Fixture::default();
    make_tree(&fx.src, 10);
    fx.sync().code(0);
    let log = fx.root.join("watch.log");
    let log_arg = log.display().to_string();
    let mut w = watch(
        &fx,
        &fx.src,
        &["--interval", "200ms", "--log-file", &log_arg],
    );
    sleep(Duration::from_millis(2000));
    assert!(w.try_status().is_none(), "watch exited:\n{}", w.stderr());
    let err = w.stderr();
    assert_eq!(summary_lines(&err), 0, "idle passes printed:\n{err}");
    assert!(err.is_empty(), "idle passes printed:\n{err}");
    let text = fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(summary_lines(&text), 0, "idle passes were logged:\n{text}");

    write(&fx.src.join("new.txt"), "new\n");
    wait_mirror(&w, &fx.src, &fx.dst, "the change");
    assert!(
        wait_until(Duration::from_secs(5), || summary_lines(&w.stderr()) >= 1),
        "the changed pass printed no summary:\n{}",
        w.stderr()
    );
    sleep(Duration::from_millis(1000));
    let err = w.stderr();
    assert_eq!(summary_lines(&err), 1, "{err}");
    assert!(err.contains("synced: 1 created"), "{err}");
    let text = fs::read_to_string(&log).unwrap();
    assert_eq!(summary_lines(&text), 1, "{text}");
    assert_eq!(stop(w), 0);
}

/// The same with -v: the per-pass `SRC -> DST` info line is not printed for idle passes either.
#[test]
fn an_idle_verbose_watch_prints_nothing_per_pass() {
    let fx = Fixture::default();
    make_tree(&fx.src, 5);
    fx.sync().code(0);
    let w = watch(&fx, &fx.src, &["--interval", "200ms", "-v"]);
    sleep(Duration::from_millis(1500));
    let err = w.stderr();
    let src: PathBuf = fs::canonicalize(&fx.src).unwrap();
    assert!(
        !err.contains(&src.display().to_string()),
        "idle passes printed:\n{err}"
    );
    assert_eq!(summary_lines(&err), 0, "{err}");
    assert_eq!(stop(w), 0);
}
