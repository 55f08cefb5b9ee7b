//! The guards that run before anything is written: one tree inside the other whatever path
//! reaches it (bind mounts, symlinks), the index and the log file outside both trees, the guard
//! rails of a dry run, a dry run with `--reindex`, and which replica and source an index may
//! serve.
//!
//! Tests that need a bind mount run only as root; otherwise they print why and pass.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// A bind mount that is unmounted when the test ends, even when it fails. Declare it after the
/// [`Fixture`] so that it is dropped (unmounted) before the fixture's directory is removed.
struct BindMount(PathBuf);

impl BindMount {
    /// Binds `from` at `at` (created if missing); `None`, with the reason printed, when this
    /// test cannot mount.
    fn new(test: &str, from: &Path, at: &Path) -> Option<BindMount> {
        if !is_root() {
            eprintln!("skipping {test}: bind mounts need root");
            return None;
        }
        mkdir(at);
        match Command::new("mount")
            .arg("--bind")
            .arg(from)
            .arg(at)
            .status()
        {
            Ok(st) if st.success() => Some(BindMount(at.to_path_buf())),
            other => {
                eprintln!("skipping {test}: mount --bind failed: {other:?}");
                None
            }
        }
    }
}

impl Drop for BindMount {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.0)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

/// Runs `dirsync ARGS...` with the fixture's state dir and `HOME`.
fn run(fx: &Fixture, args: &[&Path]) -> assert_cmd::assert::Assert {
    fx.cmd().args(args).assert()
}

fn p(s: &str) -> &Path {
    Path::new(s)
}

/// Runs `sync`, `sync -n` and `status` with `args` after the subcommand, and checks that each
/// exits 1 with a message containing every one of `words`, and leaves `root` as it was.
#[track_caller]
fn assert_refused(fx: &Fixture, root: &Path, args: &[&Path], words: &[&str]) {
    for sub in [&["sync"][..], &["sync", "-n"], &["status"]] {
        let before = snapshot(root);
        let mut all: Vec<&Path> = sub.iter().map(|s| p(s)).collect();
        all.extend_from_slice(args);
        let a = run(fx, &all).code(1);
        let err = stderr_of(&a);
        for w in words {
            assert!(
                err.contains(w),
                "`dirsync {}` should say {w:?}, got: {err}",
                sub.join(" ")
            );
        }
        assert_unchanged(
            &before,
            &snapshot(root),
            &format!("the area after a refused `dirsync {}`", sub.join(" ")),
        );
    }
}

// =============================================================================================
// Item 4: one tree inside the other, compared by (device, inode)
// =============================================================================================

#[test]
fn replica_that_is_a_bind_mount_of_the_source_parent_is_refused() {
    let fx = Fixture::default();
    let parent = fx.root.join("parent");
    write(&parent.join("src/f1"), "1\n");
    write(&parent.join("other/keep"), "o\n");
    let bp = fx.root.join("bp");
    let Some(_m) = BindMount::new("item 4 repro", &parent, &bp) else {
        return;
    };
    let before = snapshot(&parent);
    assert_refused(
        &fx,
        &parent,
        &[&parent.join("src"), &bp],
        &["inside", "source"],
    );
    assert_unchanged(&before, &snapshot(&parent), "parent");
    assert!(parent.join("src/f1").is_file() && parent.join("other/keep").is_file());
}

#[test]
fn replica_inside_the_source_through_a_bind_mount_is_refused() {
    let fx = Fixture::default();
    make_tree(&fx.src, 5);
    let bs = fx.root.join("bs");
    let Some(_m) = BindMount::new("dst inside src via bind mount", &fx.src, &bs) else {
        return;
    };
    // A missing replica below the mount, and an existing directory below it.
    let missing = bs.join("replica");
    assert_refused(&fx, &fx.src, &[&fx.src, &missing], &["inside"]);
    assert!(!fx.src.join("replica").exists(), "the replica was created");
    assert_refused(&fx, &fx.src, &[&fx.src, &bs.join("d1")], &["inside"]);
    // The mount is the same directory as the source.
    assert_refused(&fx, &fx.src, &[&fx.src, &bs], &["same directory"]);
    assert_refused(&fx, &fx.src, &[&bs, &fx.src], &["same directory"]);
}

#[test]
fn source_reached_through_a_bind_mounted_subdirectory_of_the_replica_is_refused() {
    // `..` from the mount leads to the mount point's parent, not to the replica: the guard
    // must know where the mounted directory lives in its filesystem.
    let fx = Fixture::default();
    let data = fx.root.join("data");
    write(&data.join("photos/src/img"), "pixels\n");
    write(&data.join("docs/thesis.tex"), "precious\n");
    let m = fx.root.join("m");
    let Some(_m) = BindMount::new(
        "src in dst via a subdirectory mount",
        &data.join("photos"),
        &m,
    ) else {
        return;
    };
    assert_refused(&fx, &data, &[&m.join("src"), &data], &["inside"]);
    // And the other way round: the replica below a mounted subdirectory of the source.
    assert_refused(&fx, &data, &[&data, &m.join("backup")], &["inside"]);
    assert!(!data.join("photos/backup").exists());
}

// =============================================================================================
// Item 7: the index and the log file, resolved before they are checked
// =============================================================================================

#[test]
fn index_symlinked_into_the_source_is_refused() {
    let fx = Fixture::default();
    make_tree(&fx.src, 5);
    let link = fx.root.join("i");
    symlink("src/x.redb", &link);
    let before = fx.area_snapshot();
    for sub in ["sync", "status", "watch"] {
        let a = fx
            .cmd()
            .args([sub, "--index"])
            .arg(&link)
            .arg(&fx.src)
            .arg(&fx.dst)
            .assert()
            .code(1);
        let err = stderr_of(&a);
        assert!(
            err.contains("inside the source") && err.contains(&link.display().to_string()),
            "{sub}: {err}"
        );
        assert!(
            !fx.src.join("x.redb").exists(),
            "{sub} created the index in the source"
        );
    }
    assert_unchanged(&before, &fx.area_snapshot(), "the area");
    // A chain of links ending in the source, the last one relative.
    let l2 = fx.root.join("i2");
    symlink(&link, &l2);
    let a = fx
        .cmd()
        .args(["sync", "--index"])
        .arg(&l2)
        .arg(&fx.src)
        .arg(&fx.dst)
        .assert()
        .code(1);
    assert!(stderr_of(&a).contains("inside the source"));
    assert!(!fx.dst.exists());
}

#[test]
fn log_file_symlinked_into_the_replica_is_refused() {
    let fx = Fixture::default();
    make_tree(&fx.src, 5);
    fx.sync().code(0);
    let link = fx.root.join("l");
    symlink(fx.dst.join("sync.log"), &link);
    let before = fx.area_snapshot();
    for sub in ["sync", "watch"] {
        let a = fx
            .cmd()
            .args([sub, "--log-file"])
            .arg(&link)
            .arg(&fx.src)
            .arg(&fx.dst)
            .assert()
            .code(1);
        let err = stderr_of(&a);
        assert!(
            err.contains("inside the replica") && err.contains(&link.display().to_string()),
            "{sub}: {err}"
        );
    }
    assert_unchanged(&before, &fx.area_snapshot(), "the area");
    assert!(!fx.dst.join("sync.log").exists());
}

#[test]
fn log_file_outside_both_trees_through_a_symlink_is_written_at_its_target() {
    let fx = Fixture::default();
    make_tree(&fx.src, 3);
    let logs = fx.root.join("logs");
    mkdir(&logs);
    let link = fx.root.join("l");
    symlink("logs/sync.log", &link);
    fx.cmd()
        .args(["sync", "--log-file"])
        .arg(&link)
        .arg(&fx.src)
        .arg(&fx.dst)
        .assert()
        .code(0);
    let text = fs::read_to_string(logs.join("sync.log")).unwrap();
    assert!(text.contains("synced: "), "{text}");
    assert!(
        fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink()
    );
}

#[test]
fn index_and_log_file_inside_a_tree_through_a_bind_mount_are_refused() {
    let fx = Fixture::default();
    make_tree(&fx.src, 5);
    fx.sync().code(0);
    let bs = fx.root.join("bs");
    let Some(_ms) = BindMount::new("index via bind mount", &fx.src, &bs) else {
        return;
    };
    let bd = fx.root.join("bd");
    let Some(_md) = BindMount::new("log via bind mount", &fx.dst, &bd) else {
        return;
    };
    let cases = [
        ("--index", bs.join("x.redb"), "inside the source"),
        ("--index", bd.join("sub/x.redb"), "inside the replica"),
        ("--log-file", bs.join("sync.log"), "inside the source"),
        ("--log-file", bd.join("sync.log"), "inside the replica"),
    ];
    let (src_before, dst_before) = (snapshot(&fx.src), snapshot(&fx.dst));
    for (flag, path, what) in &cases {
        for sub in ["sync", "status", "watch"] {
            if *flag == "--log-file" && sub == "status" {
                continue;
            }
            let a = fx
                .cmd()
                .args([sub, flag])
                .arg(path)
                .arg(&fx.src)
                .arg(&fx.dst)
                .assert()
                .code(1);
            let err = stderr_of(&a);
            assert!(err.contains(what), "{sub} {flag} {}: {err}", path.display());
        }
    }
    assert_unchanged(&src_before, &snapshot(&fx.src), "source");
    assert_unchanged(&dst_before, &snapshot(&fx.dst), "replica");
}

// =============================================================================================
// Item 13: a dry run applies the guard rails
// =============================================================================================

#[test]
fn dry_run_over_max_delete_exits_1_as_the_real_run() {
    let fx = Fixture::default();
    make_tree(&fx.src, 10);
    fx.sync().code(0);
    fs::remove_file(fx.src.join("f0000.dat")).unwrap();
    let before = snapshot(&fx.dst);
    let real = stderr_of(&fx.run("sync", &["--max-delete", "0"]).code(1));
    let dry = fx.run("sync", &["-n", "--max-delete", "0"]).code(1);
    let err = stderr_of(&dry);
    assert!(err.contains("--max-delete 0"), "{err}");
    let refusal = |s: &str| {
        s.lines()
            .find(|l| l.contains("--max-delete"))
            .map(str::to_owned)
    };
    assert_eq!(
        refusal(&err),
        refusal(&real),
        "the same message as the real run"
    );
    // The plan is still printed, so the user sees what would have been deleted.
    assert!(stdout_lines(&dry).contains(&"D f0000.dat".to_string()));
    assert_unchanged(&before, &snapshot(&fx.dst), "replica");
    fx.run("sync", &["-n", "--max-delete", "1"]).code(0);
}

#[test]
fn dry_run_from_an_empty_source_exits_1_and_status_says_why() {
    let fx = Fixture::default();
    make_tree(&fx.src, 5);
    fx.sync().code(0);
    fs::remove_dir_all(&fx.src).unwrap();
    mkdir(&fx.src);
    let before = snapshot(&fx.dst);
    let real = stderr_of(&fx.sync().code(1));
    let err = stderr_of(&fx.run("sync", &["-n"]).code(1));
    assert!(
        err.contains("is empty") && err.contains("--allow-empty-source"),
        "{err}"
    );
    let refusal = |s: &str| {
        s.lines()
            .find(|l| l.contains("is empty"))
            .map(str::to_owned)
    };
    assert_eq!(
        refusal(&err),
        refusal(&real),
        "the same message as the real run"
    );
    fx.run("sync", &["-n", "--allow-empty-source"]).code(0);
    // `status` shows the plan, exits as before, and says that a sync would be refused.
    let st = fx.status().code(0);
    assert!(!stdout_lines(&st).is_empty());
    let err = stderr_of(&st);
    assert!(err.contains("refuse") && err.contains("is empty"), "{err}");
    assert_unchanged(&before, &snapshot(&fx.dst), "replica");
}

// =============================================================================================
// Item 18: `sync -n --reindex`
// =============================================================================================

/// Everything in the state dir, inodes and mtimes included.
fn state_snapshot(fx: &Fixture) -> Snapshot {
    snapshot(&fx.state)
}

#[test]
fn dry_run_with_reindex_plans_from_an_empty_index_and_writes_nothing() {
    let fx = Fixture::default();
    make_tree(&fx.src, 10);
    fx.sync().code(0);
    // A damaged index: a plain dry run sends the user to --reindex.
    let dir = fx.state.join("dirsync");
    let index = fs::read_dir(&dir).unwrap().next().unwrap().unwrap().path();
    fs::write(&index, vec![0xa5u8; 8192]).unwrap();
    write(&fx.src.join("new.txt"), "new\n");
    let err = stderr_of(&fx.run("sync", &["-n"]).code(1));
    assert!(err.contains("--reindex"), "{err}");

    let (state_before, dst_before) = (state_snapshot(&fx), snapshot(&fx.dst));
    let a = fx.run("sync", &["-n", "--reindex"]).code(0);
    assert!(
        stdout_lines(&a).contains(&"A new.txt".to_string()),
        "{}",
        stderr_of(&a)
    );
    assert_unchanged(&state_before, &state_snapshot(&fx), "the state dir");
    assert_unchanged(&dst_before, &snapshot(&fx.dst), "the replica");

    // Without any index: none is created.
    fs::remove_dir_all(&fx.state).unwrap();
    mkdir(&fx.state);
    let a = fx.run("sync", &["-n", "--reindex"]).code(0);
    assert!(stdout_lines(&a).contains(&"A new.txt".to_string()));
    assert!(
        state_snapshot(&fx).is_empty(),
        "{:?}",
        state_snapshot(&fx).keys()
    );
    assert_unchanged(&dst_before, &snapshot(&fx.dst), "the replica");
}

#[test]
fn dry_run_with_reindex_accepts_an_index_of_another_replica() {
    let fx = Fixture::default();
    make_tree(&fx.src, 5);
    let idx = fx.root.join("shared.redb");
    let other = fx.root.join("other");
    run(&fx, &[p("sync"), p("--index"), &idx, &fx.src, &other]).code(0);
    let before = fs::read(&idx).unwrap();
    let a = run(
        &fx,
        &[
            p("sync"),
            p("-n"),
            p("--reindex"),
            p("--index"),
            &idx,
            &fx.src,
            &fx.dst,
        ],
    )
    .code(0);
    assert!(stdout_lines(&a).contains(&"A f0000.dat".to_string()));
    assert!(
        fs::read(&idx).unwrap() == before,
        "the dry run wrote the index"
    );
    assert!(!fx.dst.exists());
}

// =============================================================================================
// Item 17: the index belongs to the replica; a new source resets only its hash cache
// =============================================================================================

fn inodes(root: &Path) -> BTreeMap<Vec<u8>, u64> {
    snapshot(root)
        .into_iter()
        .map(|(k, n)| (k, n.ino))
        .collect()
}

#[test]
fn a_retargeted_source_symlink_reuses_the_replica_records() {
    let fx = Fixture::default();
    let r1 = fx.root.join("r1");
    let r2 = fx.root.join("r2");
    make_tree(&r1, 20);
    make_tree(&r2, 20);
    write(&r2.join("d1/f0001.dat"), "changed in release 2\n");
    write(&r2.join("added.txt"), "new in release 2\n");
    let current = fx.root.join("current");
    symlink("r1", &current);
    run(&fx, &[p("sync"), &current, &fx.dst]).code(0);
    assert_mirror(&r1, &fx.dst);
    let before = inodes(&fx.dst);

    fs::remove_file(&current).unwrap();
    symlink("r2", &current);
    // `status` follows the link too, and writes nothing.
    let state = fx.state_contents();
    let st = run(&fx, &[p("status"), &current, &fx.dst]).code(0);
    let lines = stdout_lines(&st);
    for want in ["A added.txt", "M d1/f0001.dat"] {
        assert!(
            lines.contains(&want.to_string()),
            "{lines:?} {}",
            stderr_of(&st)
        );
    }
    fx.assert_state_unchanged(&state, "status after the source changed");

    let a = run(&fx, &[p("sync"), p("-v"), &current, &fx.dst]).code(0);
    let err = stderr_of(&a);
    assert!(
        err.contains("source changed from") && err.contains("hash cache was reset"),
        "{err}"
    );
    assert_mirror(&r2, &fx.dst);
    let after = inodes(&fx.dst);
    for (path, ino) in &before {
        if path.as_slice() != b"d1/f0001.dat" {
            assert_eq!(after.get(path), Some(ino), "{} was rewritten", show(path));
        }
    }
    // The second sync recorded the new source: nothing left to do, nothing said about it.
    let again = run(&fx, &[p("sync"), p("-v"), &current, &fx.dst]).code(0);
    assert!(!stderr_of(&again).contains("source changed"));
    let st = run(&fx, &[p("status"), &current, &fx.dst]).code(0);
    assert!(stdout_lines(&st).is_empty());
}

// =============================================================================================
// Item 21: a relative XDG_STATE_HOME; an index of another replica
// =============================================================================================

#[test]
fn a_relative_xdg_state_home_is_ignored() {
    let fx = Fixture::default();
    make_tree(&fx.src, 3);
    let cwd = fx.root.join("cwd");
    mkdir(&cwd);
    fx.cmd()
        .current_dir(&cwd)
        .env("XDG_STATE_HOME", "relative-state")
        .arg("sync")
        .arg(&fx.src)
        .arg(&fx.dst)
        .assert()
        .code(0);
    assert!(
        !cwd.join("relative-state").exists(),
        "a relative XDG_STATE_HOME was used"
    );
    let dir = fx.home.join(".local/state/dirsync");
    assert!(
        dir.is_dir() && count_entries(&dir) > 0,
        "the index should fall back to $HOME/.local/state/dirsync"
    );
}

#[test]
fn an_index_made_for_another_replica_is_refused() {
    let fx = Fixture::default();
    make_tree(&fx.src, 5);
    let idx = fx.root.join("same.redb");
    let dst1 = fx.root.join("dst1");
    let dst2 = fx.root.join("dst2");
    run(&fx, &[p("sync"), p("--index"), &idx, &fx.src, &dst1]).code(0);
    mkdir(&dst2);
    for sub in [&["sync"][..], &["sync", "-n"], &["status"], &["verify"]] {
        let before = fs::read(&idx).unwrap();
        let mut args: Vec<&Path> = sub.iter().map(|s| p(s)).collect();
        args.extend([p("--index"), &idx, &fx.src, &dst2]);
        let err = stderr_of(&run(&fx, &args).code(1));
        assert!(
            err.contains(&format!("was made for replica {}", dst1.display()))
                && err.contains(&dst2.display().to_string())
                && err.contains("--reindex"),
            "{}: {err}",
            sub.join(" ")
        );
        assert_eq!(
            count_entries(&dst2),
            0,
            "{} wrote to the second replica",
            sub.join(" ")
        );
        if sub.contains(&"status") || sub.contains(&"-n") {
            assert!(
                fs::read(&idx).unwrap() == before,
                "{} wrote the index",
                sub.join(" ")
            );
        }
    }
    // The index still serves its replica.
    let st = run(&fx, &[p("status"), p("--index"), &idx, &fx.src, &dst1]).code(0);
    assert!(stdout_lines(&st).is_empty(), "{}", stderr_of(&st));
    // The same replica through a symlink is the same replica.
    let link = fx.root.join("dst1-link");
    symlink("dst1", &link);
    run(&fx, &[p("sync"), p("--index"), &idx, &fx.src, &link]).code(0);
    // --reindex starts the index over for the new replica.
    run(
        &fx,
        &[
            p("sync"),
            p("--reindex"),
            p("--index"),
            &idx,
            &fx.src,
            &dst2,
        ],
    )
    .code(0);
    assert_mirror(&fx.src, &dst2);
    run(&fx, &[p("sync"), p("--index"), &idx, &fx.src, &dst2]).code(0);
    let err = stderr_of(&run(&fx, &[p("sync"), p("--index"), &idx, &fx.src, &dst1]).code(1));
    assert!(err.contains("was made for replica"), "{err}");
}
