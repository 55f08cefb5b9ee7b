//! `verify` and `verify --repair`, and the check of copies made inside the replica.
//!
//! - `--repair` rewrites only the replica files found corrupt (or missing), from the source and
//!   only when the source still has the content they were written with; it never runs a sync
//!   (no deletion, no other pending change reaches the replica). `--dry-run` says what it would
//!   do and changes nothing.
//! - `verify` on a replica that does not exist, or without an index, is an error that creates
//!   nothing; recorded files missing from the replica are differences.
//! - A file copied inside the replica (`C from -> to`) is checked against the source's hash,
//!   also when the kernel copies it; a corrupt copy source is repaired, not spread.
//!
//! Every outcome is checked with the independent walker in `common`.

mod common;

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

fn read_bytes(path: &Path) -> Vec<u8> {
    fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// Flips the first byte of a file in place and puts its mtime back, as the issue's
/// reproduction does with `dd conv=notrunc` and `touch -d`: size and mtime are kept.
fn corrupt_in_place(path: &Path) {
    let md = fs::symlink_metadata(path).unwrap();
    let mut f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut first = [0u8];
    f.read_exact(&mut first).unwrap();
    f.seek(SeekFrom::Start(0)).unwrap();
    f.write_all(&[first[0] ^ 0x5a]).unwrap();
    drop(f);
    set_mtime(path, md.mtime(), md.mtime_nsec() as u32);
    assert_eq!(fs::metadata(path).unwrap().len(), md.len());
}

fn mtime_ns(path: &Path) -> i128 {
    let md = fs::symlink_metadata(path).unwrap();
    i128::from(md.mtime()) * 1_000_000_000 + i128::from(md.mtime_nsec())
}

/// The snapshot without `path`: what must not change when only `path` is repaired.
fn without(mut s: Snapshot, path: &str) -> Snapshot {
    s.remove(path.as_bytes());
    s
}

fn has_line(lines: &[String], want: &str) -> bool {
    lines.iter().any(|l| l == want)
}

// ---------------------------------------------------------------------------------------------
// Item 1: --repair rewrites only the corrupt files
// ---------------------------------------------------------------------------------------------

/// The reproduction: a file deleted from the source by mistake must survive the repair
/// of another, corrupt file.
#[test]
fn repair_rewrites_only_the_corrupt_file_and_no_pending_change() {
    let fx = Fixture::default();
    write(&fx.src.join("thesis.tex"), "precious\n");
    write(&fx.src.join("photo.jpg"), "photo\n");
    write(&fx.src.join("d/notes.txt"), "notes\n");
    fx.run("sync", &["-q"]).code(0);
    fs::remove_file(fx.src.join("thesis.tex")).unwrap();
    write(&fx.src.join("d/new.txt"), "a pending addition\n");
    corrupt_in_place(&fx.dst.join("photo.jpg"));
    let before = snapshot(&fx.dst);
    let root_mtime = mtime_ns(&fx.dst);

    let a = fx.run("verify", &["--repair"]).code(0);
    let lines = stdout_lines(&a);
    assert!(
        has_line(&lines, "repaired photo.jpg"),
        "stdout: {lines:?}\nstderr: {}",
        stderr_of(&a)
    );
    assert_eq!(
        lines.len(),
        1,
        "only the corrupt file is reported: {lines:?}"
    );

    assert_eq!(read_bytes(&fx.dst.join("photo.jpg")), b"photo\n");
    assert_eq!(
        read_bytes(&fx.dst.join("thesis.tex")),
        b"precious\n",
        "repair propagated the deletion of thesis.tex"
    );
    assert!(
        !fx.dst.join("d/new.txt").exists(),
        "repair propagated a pending addition"
    );
    // Nothing else changed: not the other files, not the directories' metadata.
    let after = snapshot(&fx.dst);
    assert_unchanged(
        &without(before, "photo.jpg"),
        &without(after.clone(), "photo.jpg"),
        "verify --repair (outside photo.jpg)",
    );
    assert_eq!(
        mtime_ns(&fx.dst),
        root_mtime,
        "the replica root's mtime changed"
    );

    // The repair is recorded: verify is clean now, and the sync still has its work to do.
    fx.run("verify", &[]).code(0);
    // (Metadata lines too: the source's directories changed with the deletion and addition.)
    let mut pending: Vec<String> = fx
        .status_lines()
        .into_iter()
        .filter(|l| !l.starts_with("m "))
        .collect();
    pending.sort();
    assert_eq!(pending, ["A d/new.txt", "D thesis.tex"]);
}

/// A corrupt file whose source changed (or is gone) since it was written cannot be repaired
/// from the source: it is reported and left as it is, and the exit code says so.
#[test]
fn repair_leaves_a_corrupt_file_whose_source_changed_or_vanished() {
    let fx = Fixture::default();
    write(&fx.src.join("photo.jpg"), "photo\n");
    write(&fx.src.join("gone.txt"), "gone\n");
    write(&fx.src.join("ok.txt"), "ok\n");
    fx.sync().code(0);
    write(&fx.src.join("photo.jpg"), "a new photo\n");
    fs::remove_file(fx.src.join("gone.txt")).unwrap();
    corrupt_in_place(&fx.dst.join("photo.jpg"));
    corrupt_in_place(&fx.dst.join("gone.txt"));
    let before = snapshot(&fx.dst);
    let root_mtime = mtime_ns(&fx.dst);

    let a = fx.run("verify", &["--repair"]).code(3);
    let (lines, err) = (stdout_lines(&a), stderr_of(&a));
    for p in ["photo.jpg", "gone.txt"] {
        assert!(
            has_line(&lines, &format!("corrupt {p}")),
            "stdout: {lines:?}"
        );
        assert!(
            err.contains(&format!(
                "corrupt {p}: the source no longer has the content it was written with; \
                 run `dirsync sync` to bring it up to date"
            )),
            "stderr: {err}"
        );
    }
    assert_unchanged(&before, &snapshot(&fx.dst), "verify --repair");
    assert_eq!(mtime_ns(&fx.dst), root_mtime);
    // Still corrupt, still reported.
    let a = fx.run("verify", &[]).code(3);
    assert!(has_line(&stdout_lines(&a), "corrupt photo.jpg"));
    // A sync brings both up to date.
    fx.sync().code(0);
    assert_mirror(&fx.src, &fx.dst);
    fx.run("verify", &[]).code(0);
}

/// A corrupt inode with two names is repaired once and linked again: the hard links survive.
#[test]
fn repair_keeps_hard_links_linked() {
    let fx = Fixture::default();
    write(&fx.src.join("a"), "shared bytes\n");
    fs::hard_link(fx.src.join("a"), fx.src.join("b")).unwrap();
    write(&fx.src.join("c"), "other\n");
    fx.sync().code(0);
    assert_eq!(ino(&fx.dst.join("a")), ino(&fx.dst.join("b")));
    // A hard link is recorded with its leader: verify compares it with the leader's hash.
    fx.run("verify", &[]).code(0);
    corrupt_in_place(&fx.dst.join("a"));
    let a = fx.run("verify", &["--repair"]).code(0);
    assert_eq!(stdout_lines(&a), ["repaired a", "repaired b"]);
    assert_eq!(read_bytes(&fx.dst.join("b")), b"shared bytes\n");
    assert_mirror(&fx.src, &fx.dst);
    fx.run("verify", &[]).code(0);
    fx.assert_up_to_date();
}

/// `--dry-run` says what a repair would do and changes nothing anywhere: not the replica, not
/// the source, not the index.
#[test]
fn repair_dry_run_reports_and_changes_nothing() {
    let fx = Fixture::default();
    write(&fx.src.join("photo.jpg"), "photo\n");
    write(&fx.src.join("d/notes.txt"), "notes\n");
    write(&fx.src.join("d/lost.txt"), "lost\n");
    fx.sync().code(0);
    write(&fx.src.join("d/notes.txt"), "notes, edited\n");
    corrupt_in_place(&fx.dst.join("photo.jpg"));
    corrupt_in_place(&fx.dst.join("d/notes.txt"));
    fs::remove_file(fx.dst.join("d/lost.txt")).unwrap();
    let area = fx.area_snapshot();
    let ctimes_before = ctimes(&fx.root);
    let index = fx.state_contents();

    for flag in ["--dry-run", "-n"] {
        let a = fx.run("verify", &["--repair", flag]).code(3);
        let lines = stdout_lines(&a);
        assert!(has_line(&lines, "would repair photo.jpg"), "{lines:?}");
        assert!(has_line(&lines, "would restore d/lost.txt"), "{lines:?}");
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("cannot repair d/notes.txt: ")),
            "{lines:?}"
        );
        assert_unchanged(&area, &fx.area_snapshot(), "verify --repair --dry-run");
        assert_eq!(ctimes_before, ctimes(&fx.root), "dry-run wrote something");
        fx.assert_state_unchanged(&index, "verify --repair --dry-run");
        assert_eq!(fx.state_contents().len(), index.len());
    }
    // Without --repair, verify changes nothing either.
    fx.run("verify", &[]).code(3);
    assert_unchanged(&area, &fx.area_snapshot(), "verify");
    fx.assert_state_unchanged(&index, "verify");

    // Only the repairable file could be made good: the real run repairs it, exits 3 for the
    // other, and then a dry run has nothing left that it could repair.
    fx.run("verify", &["--repair"]).code(3);
    assert_eq!(read_bytes(&fx.dst.join("photo.jpg")), b"photo\n");
    assert_eq!(read_bytes(&fx.dst.join("d/lost.txt")), b"lost\n");
    let a = fx.run("verify", &["--repair", "-n"]).code(3);
    let lines = stdout_lines(&a);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].starts_with("cannot repair d/notes.txt: "));
}

// ---------------------------------------------------------------------------------------------
// Item 12: a missing replica is an error; missing recorded files are differences
// ---------------------------------------------------------------------------------------------

/// Every file below `dir`, as paths relative to it.
fn files_below(dir: &Path) -> Vec<String> {
    snapshot(dir)
        .into_keys()
        .map(|k| String::from_utf8(k).unwrap())
        .collect()
}

#[test]
fn verify_refuses_a_missing_replica_and_creates_no_index() {
    let fx = Fixture::default();
    write(&fx.src.join("a"), "a\n");
    // Never synced: the replica and its index do not exist.
    for args in [&[][..], &["--repair"], &["--repair", "-n"]] {
        let a = fx.run("verify", args).code(1);
        let err = stderr_of(&a);
        assert!(err.contains("does not exist"), "{err}");
        assert!(err.contains("mounted"), "{err}");
        assert!(!fx.dst.exists(), "verify created the replica");
        assert_eq!(
            files_below(&fx.state),
            Vec::<String>::new(),
            "verify wrote state"
        );
    }

    // Synced, then the disk is "unmounted": the index stays as it was, nothing is created.
    fx.sync().code(0);
    let index = fx.state_contents();
    let state_files = files_below(&fx.state);
    fs::rename(&fx.dst, fx.root.join("dst.unmounted")).unwrap();
    let a = fx.run("verify", &[]).code(1);
    assert!(
        stderr_of(&a).contains("does not exist"),
        "{}",
        stderr_of(&a)
    );
    assert!(!fx.dst.exists());
    assert_eq!(files_below(&fx.state), state_files);
    fx.assert_state_unchanged(&index, "verify of a missing replica");

    // A replica that is a file is refused as well.
    write(&fx.dst, "not a directory");
    fx.run("verify", &[]).code(1);
    assert_eq!(files_below(&fx.state), state_files);
}

#[test]
fn verify_without_an_index_says_to_sync_first_and_creates_none() {
    let fx = Fixture::default();
    write(&fx.src.join("a"), "a\n");
    mkdir(&fx.dst);
    write(&fx.dst.join("a"), "a\n");
    let before = snapshot(&fx.dst);
    for args in [&[][..], &["--repair"]] {
        let a = fx.run("verify", args).code(1);
        let err = stderr_of(&a);
        assert!(err.contains("no index for this replica yet"), "{err}");
        assert!(err.contains("dirsync sync"), "{err}");
        assert_eq!(
            files_below(&fx.state),
            Vec::<String>::new(),
            "verify wrote state"
        );
    }
    // An explicit --index that does not exist is not created either.
    let index = fx.root.join("elsewhere/i.redb");
    fx.run("verify", &["--index", index.to_str().unwrap()])
        .code(1);
    assert!(!fx.root.join("elsewhere").exists());
    assert_unchanged(&before, &snapshot(&fx.dst), "verify without an index");
}

#[test]
fn verify_reports_recorded_files_missing_from_the_replica() {
    let fx = Fixture::default();
    write(&fx.src.join("a"), "a\n");
    write(&fx.src.join("d/b"), "b\n");
    write(&fx.src.join("d/c"), "c\n");
    fx.sync().code(0);
    fs::remove_file(fx.dst.join("d/b")).unwrap();
    let a = fx.run("verify", &[]).code(3);
    assert_eq!(stdout_lines(&a), ["missing d/b"]);
    assert!(stderr_of(&a).contains("1 missing"), "{}", stderr_of(&a));

    // An empty replica (an empty mount point where the disk was): every file is missing.
    fs::remove_dir_all(&fx.dst).unwrap();
    mkdir(&fx.dst);
    let a = fx.run("verify", &[]).code(3);
    assert_eq!(
        stdout_lines(&a),
        ["missing a", "missing d/b", "missing d/c"]
    );
    assert!(stderr_of(&a).contains("3 missing"), "{}", stderr_of(&a));
}

#[test]
fn repair_restores_missing_files_from_the_source() {
    let fx = Fixture::default();
    make_tree(&fx.src, 24);
    write(&fx.src.join("d1/keep"), "keep\n");
    fx.sync().code(0);
    let full = snapshot(&fx.dst);
    // The replica loses everything; one of its files also changed in the source meanwhile.
    fs::remove_dir_all(&fx.dst).unwrap();
    mkdir(&fx.dst);
    write(&fx.src.join("d1/keep"), "edited\n");

    let a = fx.run("verify", &["--repair"]).code(3);
    let (lines, err) = (stdout_lines(&a), stderr_of(&a));
    assert!(has_line(&lines, "missing d1/keep"), "{lines:?}");
    assert!(
        err.contains("missing d1/keep: the source no longer has the content it was written with"),
        "{err}"
    );
    let restored = lines.iter().filter(|l| l.starts_with("restored ")).count();
    let recorded = full.values().filter(|n| n.kind == Kind::File).count();
    assert_eq!(restored, recorded - 1, "{lines:?}");
    // Everything but the changed file is back as it was, directories included.
    let mut want = full;
    want.remove(&b"d1/keep"[..]);
    // Empty directories hold no recorded file; they come back with the next sync.
    want.retain(|k, _| !k.starts_with(b"empty"));
    let got = snapshot(&fx.dst);
    assert_snapshots_mirror(
        &want,
        &got,
        "the restored replica differs from the synced one",
    );

    // The rest is the sync's work.
    fx.sync().code(0);
    assert_mirror(&fx.src, &fx.dst);
    fx.run("verify", &[]).code(0);
}

// ---------------------------------------------------------------------------------------------
// Item 5: copies inside the replica are checked against the source's hash
// ---------------------------------------------------------------------------------------------

/// An ext4 image mounted on a loop device for as long as this lives.
struct LoopDisk {
    image: PathBuf,
    mount: PathBuf,
}

impl LoopDisk {
    /// `None` (with a note) when loop mounts are not possible here.
    fn new(dir: &Path) -> Option<LoopDisk> {
        if !rustix::process::geteuid().is_root() {
            eprintln!("note: not root, cannot loop-mount an image; test skipped");
            return None;
        }
        let image = dir.join("disk.img");
        let mount = dir.join("disk");
        mkdir(&mount);
        let ok = |c: &mut Command| c.status().is_ok_and(|s| s.success());
        if !ok(Command::new("truncate").args(["-s", "64M"]).arg(&image))
            || !ok(Command::new("mkfs.ext4").arg("-q").arg(&image))
        {
            eprintln!("note: cannot make an ext4 image; test skipped");
            return None;
        }
        if !ok(Command::new("mount")
            .args(["-o", "loop"])
            .arg(&image)
            .arg(&mount))
        {
            eprintln!("note: cannot loop-mount {}; test skipped", image.display());
            return None;
        }
        Some(LoopDisk { image, mount })
    }

    /// Bit rot: flips a byte of `file`'s data on the disk itself, below the filesystem, so that
    /// its inode (size, mtime, ctime) is untouched. The file's cached pages are dropped first,
    /// so the next read sees the disk.
    fn rot(&self, file: &Path) {
        let data = read_bytes(file);
        let stat = |p: &Path| {
            let m = fs::symlink_metadata(p).unwrap();
            (
                m.len(),
                m.mtime(),
                m.mtime_nsec(),
                m.ctime(),
                m.ctime_nsec(),
                m.ino(),
                m.dev(),
            )
        };
        let before = stat(file);
        let f = fs::File::open(file).unwrap();
        f.sync_all().unwrap();
        rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed).unwrap();
        drop(f);
        let image = read_bytes(&self.image);
        let needle = &data[100..164];
        let at = image
            .windows(needle.len())
            .position(|w| w == needle)
            .expect("the file's bytes are on the image");
        let mut img = fs::OpenOptions::new()
            .write(true)
            .open(&self.image)
            .unwrap();
        img.seek(SeekFrom::Start(at as u64)).unwrap();
        img.write_all(&[needle[0] ^ 0xff]).unwrap();
        img.sync_all().unwrap();
        drop(img);
        assert_ne!(
            read_bytes(file),
            data,
            "the rot of {} is not visible",
            file.display()
        );
        assert_eq!(
            stat(file),
            before,
            "the rot of {} changed its inode",
            file.display()
        );
    }
}

impl Drop for LoopDisk {
    fn drop(&mut self) {
        let umount = |args: &[&str]| {
            Command::new("umount")
                .args(args)
                .arg(&self.mount)
                .status()
                .is_ok_and(|s| s.success())
        };
        if !umount(&[]) {
            umount(&["-l"]);
        }
    }
}

/// A replica file rots underneath (same stat); the source then gets a copy of it. The plan
/// copies the replica file (`C`) instead of reading the source; the copy must not get the bad
/// bytes, and the rotten original must be repaired too. Both ways the plan finds copy sources
/// are covered: a large file (remembered by the merge) and a small one (the recorded table).
#[test]
fn copies_inside_the_replica_are_checked_against_the_source_hash() {
    let fx = Fixture::default();
    let Some(disk) = LoopDisk::new(&fx.root) else {
        return;
    };
    let dst = disk.mount.join("dst");
    let run = |sub: &str| fx.cmd().arg(sub).arg(&fx.src).arg(&dst).assert();
    let big = bytes(1, (3 << 20) / 2);
    let small = bytes(2, 3000);
    write(&fx.src.join("big"), &big);
    write(&fx.src.join("small"), &small);
    set_mtime(&fx.src.join("big"), 1_500_000_000, 0);
    set_mtime(&fx.src.join("small"), 1_500_000_000, 0);
    run("sync").code(0);
    disk.rot(&dst.join("big"));
    disk.rot(&dst.join("small"));
    for (from, to) in [("big", "big2"), ("small", "small2")] {
        let ok = Command::new("cp")
            .arg("-p")
            .arg(fx.src.join(from))
            .arg(fx.src.join(to))
            .status()
            .unwrap()
            .success();
        assert!(ok, "cp -p {from} {to}");
    }
    // The precondition of this test: the plan copies inside the replica.
    let a = run("status").code(0);
    let mut plan = stdout_lines(&a);
    plan.sort();
    assert_eq!(plan, ["C big -> big2", "C small -> small2", "m ."]);

    let a = run("sync");
    assert!(
        read_bytes(&dst.join("big2")) == big,
        "big2 got the rotten bytes"
    );
    assert!(
        read_bytes(&dst.join("small2")) == small,
        "small2 got the rotten bytes"
    );
    assert!(read_bytes(&dst.join("big")) == big, "big was not repaired");
    assert!(
        read_bytes(&dst.join("small")) == small,
        "small was not repaired"
    );
    // Both were put right, so the sync succeeded; it says what it found.
    let a = a.code(0);
    let err = stderr_of(&a);
    for p in ["big", "small"] {
        assert!(
            err.contains(&format!(
                "replica file {p} is corrupt (its bytes no longer match what was written); \
                 it is rewritten from the source"
            )),
            "stderr: {err}"
        );
    }
    assert_mirror(&fx.src, &dst);
    run("verify").code(0);
    let a = run("status").code(0);
    assert!(stdout_lines(&a).is_empty(), "{:?}", stdout_lines(&a));
}
