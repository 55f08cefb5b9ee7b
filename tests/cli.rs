//! Black-box tests of the `dirsync` binary against docs/CLI.md.
//!
//! Every test builds trees in a private temp dir, runs the built binary and checks the real
//! outcome on disk with the independent walker in `common` (never with dirsync's own code).

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::thread::sleep;
use std::time::{Duration, Instant};

use common::*;
use proptest::prelude::*;
use rustix::process::Signal;

/// Long enough for the coarse kernel clock to tick, so a later write gets a new ctime.
const TICK: Duration = Duration::from_millis(50);

fn rel_inodes(root: &Path) -> BTreeMap<Vec<u8>, u64> {
    snapshot(root)
        .into_iter()
        .map(|(k, n)| (k, n.ino))
        .collect()
}

fn read_bytes(path: &Path) -> Vec<u8> {
    fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// Overwrites a file in place with different bytes of the same length and restores its
/// atime/mtime, so only the ctime betrays the edit.
fn sneaky_edit(path: &Path) {
    let md = fs::symlink_metadata(path).unwrap();
    let before = ctime_ns(path);
    let mut data = read_bytes(path);
    assert!(!data.is_empty(), "sneaky_edit needs a non-empty file");
    for b in &mut data {
        *b ^= 0x5a;
    }
    sleep(TICK);
    fs::write(path, &data).unwrap();
    filetime::set_file_times(
        path,
        filetime::FileTime::from_last_access_time(&md),
        filetime::FileTime::from_last_modification_time(&md),
    )
    .unwrap();
    let after = fs::symlink_metadata(path).unwrap();
    assert_eq!(
        (after.len(), after.mtime(), after.mtime_nsec()),
        (md.len(), md.mtime(), md.mtime_nsec())
    );
    assert_ne!(
        ctime_ns(path),
        before,
        "precondition: the edit must change the ctime"
    );
}

// =============================================================================================
// Basic replication
// =============================================================================================

#[test]
fn sync_into_missing_dst_creates_it() {
    let fx = Fixture::default();
    make_tree(&fx.src, 60);
    assert!(!fx.dst.exists());
    fx.sync().code(0);
    assert!(fx.dst.is_dir(), "DST was not created");
    assert_mirror(&fx.src, &fx.dst);
    fx.assert_up_to_date();
}

#[test]
fn sync_into_empty_dst() {
    let fx = Fixture::default();
    make_tree(&fx.src, 60);
    mkdir(&fx.dst);
    fx.sync().code(0);
    assert_mirror(&fx.src, &fx.dst);
    fx.assert_up_to_date();
}

#[test]
fn sync_into_non_empty_dst_adopts_matching_content_and_replaces_the_rest() {
    let fx = Fixture::default();
    let (s, d) = (&fx.src, &fx.dst);
    let data = bytes(1, 100_000);
    write(&s.join("a/data.bin"), &data);
    write(&s.join("same.txt"), "same content in both trees\n");
    write(&s.join("wrong.txt"), "the right content\n");
    write(&s.join("keep/inner.txt"), "inner\n");
    set_mtime(&s.join("same.txt"), 1_600_000_000, 111);

    // DST holds the big file under another name, `same.txt` with another mtime,
    // `wrong.txt` with other bytes, and junk that must go.
    write(&d.join("moved/elsewhere.bin"), &data);
    write(&d.join("same.txt"), "same content in both trees\n");
    set_mtime(&d.join("same.txt"), 1_500_000_000, 999);
    write(&d.join("wrong.txt"), "the WRONG content\n");
    write(&d.join("extra/x/y.txt"), "extra\n");
    write(&d.join("extra.txt"), "extra\n");
    mkdir(&d.join("keep"));
    symlink("nowhere", &d.join("keep/stray-link"));
    let adopted_ino = ino(&d.join("moved/elsewhere.bin"));
    let same_ino = ino(&d.join("same.txt"));

    fx.sync().code(0);
    assert_mirror(s, d);
    assert_eq!(
        ino(&d.join("a/data.bin")),
        adopted_ino,
        "the file already in DST with the same content should have been adopted (moved), not re-copied"
    );
    assert_eq!(
        ino(&d.join("same.txt")),
        same_ino,
        "a file with matching content was replaced"
    );
    fx.assert_up_to_date();
}

#[test]
fn second_sync_is_a_noop() {
    let fx = Fixture::default();
    make_tree(&fx.src, 40);
    symlink("f0000.dat", &fx.src.join("link"));
    fs::hard_link(fx.src.join("f0004.dat"), fx.src.join("hard.dat")).unwrap();
    fx.sync().code(0);
    assert_mirror(&fx.src, &fx.dst);

    fx.assert_up_to_date();
    let before = snapshot(&fx.dst);
    let ctimes_before = ctimes(&fx.dst);
    sleep(TICK);
    let second = fx.run("sync", &["--json"]).code(0);
    assert_unchanged(&before, &snapshot(&fx.dst), "a no-op sync");
    assert_eq!(
        ctimes_before,
        ctimes(&fx.dst),
        "a no-op sync wrote to DST (ctimes changed)"
    );
    fx.assert_up_to_date();
    let summary = json_summary(&pass_json(&second));
    assert_eq!(summary, Summary::default(), "second sync should do nothing");
}

#[test]
fn sync_prints_summary_unless_quiet() {
    let fx = Fixture::default();
    for name in ["a.txt", "b.txt", "c.txt"] {
        write(&fx.src.join(name), format!("{name}\n").repeat(100));
    }
    let first = fx.sync().code(0);
    let s = parse_summary(&stderr_of(&first));
    assert!(
        (3..=4).contains(&s.created),
        "3 files (and maybe the DST root) were created: {s:?}"
    );
    assert_eq!(
        (s.modified, s.deleted, s.moved, s.copied, s.errors),
        (0, 0, 0, 0, 0),
        "{s:?}"
    );

    write(&fx.src.join("a.txt"), "changed\n");
    fs::remove_file(fx.src.join("b.txt")).unwrap();
    write(&fx.src.join("d.txt"), "brand new\n");
    let second = fx.sync().code(0);
    let s = parse_summary(&stderr_of(&second));
    assert_eq!(
        (s.created, s.modified, s.deleted, s.moved, s.errors),
        (1, 1, 1, 0, 0),
        "{s:?}"
    );
    assert_mirror(&fx.src, &fx.dst);

    write(&fx.src.join("e.txt"), "another\n");
    let quiet = fx.run("sync", &["-q"]).code(0);
    assert_eq!(stderr_of(&quiet), "", "-q should silence the summary");
    assert_mirror(&fx.src, &fx.dst);
}

// =============================================================================================
// What gets replicated
// =============================================================================================

#[test]
fn regular_and_empty_files() {
    let fx = Fixture::default();
    write(&fx.src.join("empty"), b"");
    write(&fx.src.join("one"), b"1");
    write(&fx.src.join("text.txt"), "hello\nworld\n");
    write(&fx.src.join("binary.bin"), bytes(7, 300_000));
    write(&fx.src.join("zeros.bin"), vec![0u8; 70_000]);
    write(&fx.src.join("sub/empty-too"), b"");
    fx.sync().code(0);
    assert_mirror(&fx.src, &fx.dst);
    assert_eq!(fs::metadata(fx.dst.join("empty")).unwrap().len(), 0);
    fx.assert_up_to_date();
}

#[test]
fn nested_empty_directories() {
    let fx = Fixture::default();
    mkdir(&fx.src.join("a/b/c/d/e"));
    mkdir(&fx.src.join("a/x"));
    mkdir(&fx.src.join("lonely"));
    set_mode(&fx.src.join("a/b/c"), 0o700);
    set_mtime(&fx.src.join("a/b/c/d/e"), 1_300_000_000, 1);
    set_mtime(&fx.src.join("a/b/c/d"), 1_300_000_001, 2);
    set_mtime(&fx.src.join("a/b/c"), 1_300_000_002, 3);
    fx.sync().code(0);
    assert_mirror(&fx.src, &fx.dst);
    fx.assert_up_to_date();
}

#[test]
fn symlinks_are_copied_verbatim_and_never_followed() {
    let fx = Fixture::default();
    let s = &fx.src;
    write(&s.join("target.txt"), "target\n");
    write(&s.join("dir/inside.txt"), "inside\n");
    let outside = fx.root.join("outside");
    for i in 0..20 {
        write(&outside.join(format!("o{i}")), format!("outside {i}\n"));
    }
    symlink("target.txt", &s.join("relative"));
    symlink("../src/target.txt", &s.join("relative-up"));
    symlink(s.join("target.txt"), &s.join("absolute"));
    symlink("does/not/exist", &s.join("dangling"));
    symlink("/nonexistent/absolute/dangling", &s.join("dangling-abs"));
    symlink("dir", &s.join("dir-link"));
    symlink(&outside, &s.join("outside-link"));
    symlink("loop", &s.join("loop"));
    symlink("x".repeat(300), &s.join("long-dangling"));
    symlink(bytes_path(b"caf\xe9/not-utf8"), &s.join("non-utf8-target"));
    symlink("../..", &s.join("dir/up-up"));

    fx.sync().code(0);
    assert_mirror(s, &fx.dst);
    let d = &fx.dst;
    assert_eq!(
        fs::read_link(d.join("absolute")).unwrap(),
        s.join("target.txt")
    );
    assert_eq!(fs::read_link(d.join("outside-link")).unwrap(), outside);
    assert!(
        fs::symlink_metadata(d.join("dir-link"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert!(
        fs::symlink_metadata(d.join("outside-link"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert_eq!(
        count_entries(&outside),
        20,
        "the symlinked outside dir was touched"
    );
    fx.assert_up_to_date();
}

#[test]
fn permission_bits_including_setuid_setgid_sticky() {
    let fx = Fixture::default();
    let s = &fx.src;
    let files = [
        ("setuid", 0o4755),
        ("setgid", 0o2755),
        ("both", 0o6711),
        ("private", 0o600),
        ("none", 0o000),
        ("readonly", 0o444),
        ("all", 0o777),
        ("sticky-file", 0o1644),
    ];
    for (name, mode) in files {
        write(&s.join(name), format!("{name}\n"));
        set_mode(&s.join(name), mode);
    }
    let dirs = [
        ("tmp-like", 0o1777),
        ("closed", 0o700),
        ("group-inherit", 0o2775),
        ("read-only-dir", 0o555),
        ("no-access", 0o000),
    ];
    for (name, mode) in dirs {
        write(&s.join(name).join("child"), b"child\n");
        set_mode(&s.join(name), mode);
    }
    fx.sync().code(0);
    assert_mirror(s, &fx.dst);
    fx.assert_up_to_date();

    // A mode-only change is replicated as well.
    set_mode(&s.join("private"), 0o4700);
    set_mode(&s.join("tmp-like"), 0o0755);
    fx.sync().code(0);
    assert_mirror(s, &fx.dst);
}

#[test]
fn mtimes_with_nanoseconds_on_files_dirs_and_symlinks() {
    let fx = Fixture::default();
    let s = &fx.src;
    write(&s.join("a/b/c/file"), "deep\n");
    write(&s.join("a/file"), "shallow\n");
    write(&s.join("empty"), b"");
    write(&s.join("future"), "2100\n");
    symlink("file", &s.join("a/link"));
    symlink("dangling", &s.join("dangling"));
    set_mtime(&s.join("a/b/c/file"), 1_234_567_890, 123_456_789);
    set_mtime(&s.join("a/file"), 1_000_000_000, 1);
    set_mtime(&s.join("empty"), 1, 999_999_999);
    set_mtime(&s.join("future"), 4_102_444_800, 500_000_001);
    set_mtime(&s.join("a/link"), 1_111_111_111, 111_111_111);
    set_mtime(&s.join("dangling"), 1_222_222_222, 7);
    set_mtime(&s.join("a/b/c"), 1_300_000_000, 3);
    set_mtime(&s.join("a/b"), 1_300_000_001, 999_999_998);
    set_mtime(&s.join("a"), 1_300_000_002, 42);
    fx.sync().code(0);
    assert_mirror(s, &fx.dst);
    fx.assert_up_to_date();

    // An mtime-only change (a `touch`) is replicated too.
    set_mtime(&s.join("a/file"), 1_000_000_000, 2);
    set_mtime(&s.join("a/link"), 1_111_111_111, 111_111_112);
    set_mtime(&s.join("a/b"), 1_300_000_001, 999_999_999);
    fx.sync().code(0);
    assert_mirror(s, &fx.dst);
}

#[test]
fn ownership_is_preserved() {
    use std::os::unix::fs::lchown;
    let fx = Fixture::default();
    let s = &fx.src;
    write(&s.join("owned/file"), "owned\n");
    write(&s.join("setuid-owned"), "suid\n");
    symlink("owned/file", &s.join("owned-link"));
    lchown(s.join("owned/file"), Some(1234), Some(5678)).unwrap();
    lchown(s.join("owned"), Some(4321), Some(8765)).unwrap();
    lchown(s.join("owned-link"), Some(1111), Some(2222)).unwrap();
    lchown(s.join("setuid-owned"), Some(1234), Some(1234)).unwrap();
    // chown clears setuid, so set the mode afterwards.
    set_mode(&s.join("setuid-owned"), 0o4755);
    fx.sync().code(0);
    assert_mirror(s, &fx.dst);
    fx.assert_up_to_date();

    lchown(s.join("owned/file"), Some(99), None).unwrap();
    fx.sync().code(0);
    assert_mirror(s, &fx.dst);
}

#[test]
fn hard_links_are_preserved_both_ways() {
    let fx = Fixture::default();
    let s = &fx.src;
    write(&s.join("a/x"), "pair\n");
    fs::hard_link(s.join("a/x"), s.join("b-y")).unwrap();
    write(&s.join("t/z1"), bytes(3, 10_000));
    mkdir(&s.join("u/v"));
    fs::hard_link(s.join("t/z1"), s.join("u/z2")).unwrap();
    fs::hard_link(s.join("t/z1"), s.join("u/v/z3")).unwrap();
    write(&s.join("single"), "alone\n");
    fx.sync().code(0);
    assert_mirror(s, &fx.dst);
    assert_eq!(ino(&fx.dst.join("a/x")), ino(&fx.dst.join("b-y")));
    assert_eq!(ino(&fx.dst.join("t/z1")), ino(&fx.dst.join("u/v/z3")));
    fx.assert_up_to_date();

    // Break one link (same bytes, separate inode) and add a new name to the triple.
    fs::remove_file(s.join("b-y")).unwrap();
    fs::copy(s.join("a/x"), s.join("b-y")).unwrap();
    let md = fs::metadata(s.join("a/x")).unwrap();
    filetime::set_file_mtime(
        s.join("b-y"),
        filetime::FileTime::from_last_modification_time(&md),
    )
    .unwrap();
    fs::hard_link(s.join("t/z1"), s.join("a/w")).unwrap();
    fx.sync().code(0);
    assert_mirror(s, &fx.dst);
    assert_ne!(ino(&fx.dst.join("a/x")), ino(&fx.dst.join("b-y")));
    assert_eq!(ino(&fx.dst.join("a/w")), ino(&fx.dst.join("u/z2")));
    fx.assert_up_to_date();
}

#[test]
fn unicode_names() {
    let fx = Fixture::default();
    let names = [
        "日本語/ファイル.txt",
        "emoji_😀.txt",
        "Ǆ",
        "e\u{301}", // NFD
        "\u{e9}",   // NFC: a different name
        "Ελληνικά/κείμενο",
        "right-to-left_עברית",
    ];
    for (i, name) in names.iter().enumerate() {
        write(&fx.src.join(name), format!("{i}\n"));
    }
    fx.sync().code(0);
    assert_mirror(&fx.src, &fx.dst);
    fx.assert_up_to_date();
}

#[test]
fn non_utf8_names() {
    let fx = Fixture::default();
    let names: [&[u8]; 4] = [
        b"caf\xe9",
        b"\xff\xfe/dir/file",
        b"mixed_\xc3\x28",
        b"ok/\x80end",
    ];
    for (i, name) in names.iter().enumerate() {
        write(&fx.src.join(bytes_path(name)), format!("{i}\n"));
    }
    symlink(
        bytes_path(b"caf\xe9"),
        &fx.src.join(bytes_path(b"link\xe9")),
    );
    fx.sync().code(0);
    assert_mirror(&fx.src, &fx.dst);
    assert!(fx.dst.join(bytes_path(b"caf\xe9")).is_file());
    fx.assert_up_to_date();
}

#[test]
fn names_with_newlines_spaces_and_leading_dashes() {
    let fx = Fixture::default();
    let names = [
        "with space",
        " leading space",
        "trailing space ",
        "new\nline",
        "-leading-dash",
        "--help",
        "-",
        "-rf/--version",
        "tab\tname",
        "back\\slash",
        "quote\"s'",
        "star*?[]",
        "a -> b",
        "..dots",
        "...",
        "\\x41",
    ];
    for (i, name) in names.iter().enumerate() {
        write(&fx.src.join(name), format!("{i}\n"));
    }
    fx.sync().code(0);
    assert_mirror(&fx.src, &fx.dst);
    fx.assert_up_to_date();
}

#[test]
fn status_escapes_non_utf8_bytes() {
    let fx = Fixture::default();
    write(&fx.src.join(bytes_path(b"caf\xe9")), b"x");
    let lines = fx.status_lines();
    assert!(
        lines.iter().any(|l| l == "A caf\\xe9"),
        "expected the line `A caf\\xe9`, got {lines:?}"
    );
}

#[test]
fn fifo_is_skipped_with_a_warning() {
    let fx = Fixture::default();
    make_tree(&fx.src, 20);
    let fifo = fx.src.join("d1/my-fifo");
    rustix::fs::mkfifoat(rustix::fs::CWD, &fifo, rustix::fs::Mode::from(0o644)).unwrap();
    set_mtime(&fx.src.join("d1"), 1_450_000_000, 1);
    let a = fx.sync().code(0);
    assert!(
        stderr_of(&a).contains("my-fifo"),
        "the skipped FIFO should be named in a warning on stderr, got: {:?}",
        stderr_of(&a)
    );
    assert!(
        !fx.dst.join("d1/my-fifo").exists(),
        "the FIFO was replicated"
    );
    let mut src = snapshot(&fx.src);
    src.remove(b"d1/my-fifo".as_slice());
    assert_snapshots_mirror(&src, &snapshot(&fx.dst), "DST (minus the FIFO)");
}

// =============================================================================================
// Moves, copies, type changes
// =============================================================================================

#[test]
fn rename_of_a_file_is_a_move() {
    let fx = Fixture::default();
    write(&fx.src.join("old.bin"), bytes(11, 64 * 1024));
    write(&fx.src.join("other.txt"), "other\n");
    fx.sync().code(0);
    let moved_ino = ino(&fx.dst.join("old.bin"));

    fs::rename(fx.src.join("old.bin"), fx.src.join("new.bin")).unwrap();
    let lines = fx.status_lines();
    assert!(
        lines.iter().any(|l| l == "R old.bin -> new.bin"),
        "expected `R old.bin -> new.bin`, got {lines:?}"
    );
    assert!(
        !lines
            .iter()
            .any(|l| l.starts_with("A ") || l.starts_with("D ")),
        "a rename must not show up as add/delete: {lines:?}"
    );
    fx.sync().code(0);
    assert_mirror(&fx.src, &fx.dst);
    assert_eq!(
        ino(&fx.dst.join("new.bin")),
        moved_ino,
        "the file was re-copied, not moved"
    );
    fx.assert_up_to_date();
}

#[test]
fn rename_of_a_directory_of_500_files_is_one_move() {
    let fx = Fixture::default();
    for i in 0..500 {
        write(
            &fx.src.join(format!("big/s{}/f{i:03}.txt", i % 5)),
            format!("file number {i}\n"),
        );
    }
    write(&fx.src.join("other.txt"), "other\n");
    fx.sync().code(0);
    assert_mirror(&fx.src, &fx.dst);
    let before = rel_inodes(&fx.dst.join("big"));
    assert_eq!(before.len(), 505);

    fs::rename(fx.src.join("big"), fx.src.join("renamed")).unwrap();
    let lines = fx.status_lines();
    let moves: Vec<&String> = lines.iter().filter(|l| l.starts_with("R ")).collect();
    assert_eq!(moves, ["R big -> renamed"], "status lines: {lines:?}");
    let others: Vec<&String> = lines
        .iter()
        .filter(|l| !l.starts_with("R ") && !l.starts_with("m "))
        .collect();
    assert!(
        others.is_empty(),
        "only the move (and parent metadata) expected, got {others:?}"
    );
    assert!(
        !lines
            .iter()
            .any(|l| l.starts_with("m ") && (l.contains("big") || l.contains("renamed"))),
        "no per-file lines expected: {lines:?}"
    );

    fx.sync().code(0);
    assert_mirror(&fx.src, &fx.dst);
    let after = rel_inodes(&fx.dst.join("renamed"));
    assert_eq!(
        before, after,
        "files under the moved directory changed inode (re-copied?)"
    );
    fx.assert_up_to_date();
}

#[test]
fn duplicate_of_an_existing_file_is_reported_as_copy() {
    let fx = Fixture::default();
    write(&fx.src.join("orig.bin"), bytes(21, 32 * 1024));
    fx.sync().code(0);
    let orig_ino = ino(&fx.dst.join("orig.bin"));

    fs::copy(fx.src.join("orig.bin"), fx.src.join("copy.bin")).unwrap();
    let lines = fx.status_lines();
    assert!(
        lines.iter().any(|l| l == "C orig.bin -> copy.bin"),
        "expected `C orig.bin -> copy.bin`, got {lines:?}"
    );
    fx.sync().code(0);
    assert_mirror(&fx.src, &fx.dst);
    assert_eq!(
        ino(&fx.dst.join("orig.bin")),
        orig_ino,
        "the copy source was replaced"
    );
    fx.assert_up_to_date();
}

#[test]
fn duplicate_of_a_large_file_in_an_unchanged_directory_is_copied_inside_the_replica() {
    let fx = Fixture::default();
    write(&fx.src.join("keep/deep/orig.bin"), bytes(22, 3 << 20));
    write(&fx.src.join("keep/small.txt"), "small\n");
    fx.sync().code(0);

    fs::create_dir(fx.src.join("new")).unwrap();
    fs::copy(
        fx.src.join("keep/deep/orig.bin"),
        fx.src.join("new/copy.bin"),
    )
    .unwrap();
    let lines = fx.status_lines();
    assert!(
        lines
            .iter()
            .any(|l| l == "C keep/deep/orig.bin -> new/copy.bin"),
        "expected a copy from the unchanged replica file, got {lines:?}"
    );
    fx.sync().code(0);
    assert_mirror(&fx.src, &fx.dst);
    fx.assert_up_to_date();
}

#[test]
fn swap_of_two_files_and_two_directories() {
    let fx = Fixture::default();
    let s = &fx.src;
    write(&s.join("a"), "content of a, longer\n");
    write(&s.join("b"), "content of b\n");
    set_mode(&s.join("a"), 0o600);
    set_mtime(&s.join("a"), 1_500_000_000, 1);
    set_mtime(&s.join("b"), 1_500_000_001, 2);
    write(&s.join("d1/x"), "d1 x\n");
    write(&s.join("d2/y"), "d2 y\n");
    fx.sync().code(0);

    fs::rename(s.join("a"), s.join("tmp")).unwrap();
    fs::rename(s.join("b"), s.join("a")).unwrap();
    fs::rename(s.join("tmp"), s.join("b")).unwrap();
    fs::rename(s.join("d1"), s.join("tmpd")).unwrap();
    fs::rename(s.join("d2"), s.join("d1")).unwrap();
    fs::rename(s.join("tmpd"), s.join("d2")).unwrap();
    fx.sync().code(0);
    assert_mirror(s, &fx.dst);
    fx.assert_up_to_date();
}

#[test]
fn three_cycle_of_files() {
    let fx = Fixture::default();
    let s = &fx.src;
    for (i, name) in ["x", "y", "z"].iter().enumerate() {
        write(&s.join(name), format!("{name}\n").repeat(i + 1));
    }
    fx.sync().code(0);
    // x -> y -> z -> x
    fs::rename(s.join("z"), s.join("tmp")).unwrap();
    fs::rename(s.join("y"), s.join("z")).unwrap();
    fs::rename(s.join("x"), s.join("y")).unwrap();
    fs::rename(s.join("tmp"), s.join("x")).unwrap();
    fx.sync().code(0);
    assert_mirror(s, &fx.dst);
    fx.assert_up_to_date();
}

#[test]
fn type_changes() {
    let fx = Fixture::default();
    let s = &fx.src;
    write(&s.join("f2d"), "file becoming a dir\n");
    write(&s.join("d2f/child.txt"), "child\n");
    write(&s.join("d2f/sub/grandchild"), "grandchild\n");
    write(&s.join("f2l"), "file becoming a symlink\n");
    symlink("f2d", &s.join("l2d"));
    fx.sync().code(0);
    assert_mirror(s, &fx.dst);

    fs::remove_file(s.join("f2d")).unwrap();
    mkdir(&s.join("f2d"));
    fs::remove_dir_all(s.join("d2f")).unwrap();
    write(&s.join("d2f"), "dir became a file\n");
    fs::remove_file(s.join("f2l")).unwrap();
    symlink("d2f", &s.join("f2l"));
    fs::remove_file(s.join("l2d")).unwrap();
    write(&s.join("l2d/inside"), "symlink became a dir\n");

    let lines = fx.status_lines();
    for path in ["f2d", "d2f", "f2l", "l2d"] {
        let want = format!("T {path}");
        assert!(lines.contains(&want), "expected `{want}`, got {lines:?}");
    }
    fx.sync().code(0);
    assert_mirror(s, &fx.dst);
    fx.assert_up_to_date();
}

#[test]
fn same_size_same_mtime_modification_is_detected_by_ctime() {
    let fx = Fixture::default();
    write(&fx.src.join("f.txt"), "aaaaaaaaaaaaaaaa\n");
    write(&fx.src.join("g.txt"), "untouched\n");
    set_mtime(&fx.src.join("f.txt"), 1_600_000_000, 123);
    fx.sync().code(0);
    assert_mirror(&fx.src, &fx.dst);

    sneaky_edit(&fx.src.join("f.txt"));
    let lines = fx.status_lines();
    assert_eq!(lines, ["M f.txt"]);
    fx.sync().code(0);
    assert_mirror(&fx.src, &fx.dst);
    fx.assert_up_to_date();
}

// =============================================================================================
// Drift in DST
// =============================================================================================

#[test]
fn drift_in_dst_is_repaired() {
    use std::os::unix::fs::lchown;
    let fx = Fixture::default();
    make_tree(&fx.src, 60);
    fx.sync().code(0);
    let d = &fx.dst;

    write(&d.join("f0004.dat"), "edited behind dirsync's back");
    fs::remove_file(d.join("d1/f0001.dat")).unwrap();
    fs::remove_dir_all(d.join("d2/s2")).unwrap();
    write(&d.join("stray.txt"), "stray");
    write(&d.join("stray-dir/a/b"), "stray");
    set_mode(&d.join("f0008.dat"), 0o777);
    set_mtime(&d.join("f0012.dat"), 1_700_000_000, 0);
    set_mtime(&d.join("d3"), 1_700_000_000, 0);
    set_mode(&d.join("d4"), 0o700);
    fs::remove_file(d.join("f0016.dat")).unwrap();
    symlink("somewhere", &d.join("f0016.dat"));
    lchown(d.join("f0020.dat"), Some(777), Some(777)).unwrap();
    fs::remove_file(d.join("f0024.dat")).unwrap();
    fs::hard_link(d.join("f0028.dat"), d.join("f0024.dat")).unwrap();
    fs::File::create(d.join("f0032.dat")).unwrap(); // truncated
    fs::remove_dir_all(d.join("empty/deeper")).unwrap();

    fx.sync().code(0);
    assert_mirror(&fx.src, &fx.dst);
    fx.assert_up_to_date();
}

#[test]
fn sneaky_same_size_same_mtime_drift_in_dst_is_repaired() {
    let fx = Fixture::default();
    make_tree(&fx.src, 20);
    fx.sync().code(0);
    sneaky_edit(&fx.dst.join("d1/f0001.dat"));
    fx.sync().code(0);
    assert_mirror(&fx.src, &fx.dst);
}

// =============================================================================================
// status, --dry-run, --log-file
// =============================================================================================

const T0: (i64, u32) = (1_600_000_000, 5);

/// Syncs a small tree, then edits SRC so that exactly one change of each kind is pending.
/// Directory mtimes are put back so they add no `m` lines of their own.
fn all_ops_scenario(fx: &Fixture) {
    let s = &fx.src;
    mkdir(&s.join("add"));
    let files = [
        ("del.txt", "delete me\n"),
        ("meta.txt", "only the mode changes\n"),
        ("mod.txt", "original content\n"),
        ("orig.txt", "the original of a copy\n"),
        ("ren_old.txt", "a file that gets renamed\n"),
        ("type", "a file that becomes a directory\n"),
    ];
    for (i, (name, text)) in files.iter().enumerate() {
        write(&s.join(name), text);
        set_mode(&s.join(name), 0o644);
        set_mtime(&s.join(name), 1_500_000_000 + i as i64, 0);
    }
    set_mtime(&s.join("add"), T0.0, T0.1);
    set_mtime(s, T0.0, T0.1);
    fx.sync().code(0);
    assert_mirror(s, &fx.dst);

    write(&s.join("add/new.txt"), "new\n");
    write(&s.join("mod.txt"), "modified content, longer\n");
    fs::remove_file(s.join("del.txt")).unwrap();
    fs::rename(s.join("ren_old.txt"), s.join("ren_new.txt")).unwrap();
    fs::copy(s.join("orig.txt"), s.join("copy.txt")).unwrap();
    fs::remove_file(s.join("type")).unwrap();
    mkdir(&s.join("type"));
    set_mode(&s.join("meta.txt"), 0o600);
    set_mtime(&s.join("add"), T0.0, T0.1);
    set_mtime(s, T0.0, T0.1);
}

const ALL_OPS_LINES: [&str; 7] = [
    "A add/new.txt",
    "C orig.txt -> copy.txt",
    "D del.txt",
    "m meta.txt",
    "M mod.txt",
    "R ren_old.txt -> ren_new.txt",
    "T type",
];

#[test]
fn status_prints_one_sorted_line_per_change() {
    let fx = Fixture::default();
    all_ops_scenario(&fx);
    assert_eq!(fx.status_lines(), ALL_OPS_LINES);
}

#[test]
fn status_json_has_changes_and_summary() {
    let fx = Fixture::default();
    all_ops_scenario(&fx);
    let a = fx.run("status", &["--json"]).code(0);
    let doc: serde_json::Value = serde_json::from_slice(&a.get_output().stdout)
        .expect("status --json prints one JSON document");
    let changes = doc["changes"].as_array().expect("`changes` is an array");
    let got: Vec<(String, Option<String>, String)> = changes
        .iter()
        .map(|c| {
            (
                c["op"].as_str().expect("op").to_owned(),
                c.get("from").and_then(|f| f.as_str()).map(str::to_owned),
                c["path"].as_str().expect("path").to_owned(),
            )
        })
        .collect();
    let want: Vec<(String, Option<String>, String)> = [
        ("A", None, "add/new.txt"),
        ("C", Some("orig.txt"), "copy.txt"),
        ("D", None, "del.txt"),
        ("m", None, "meta.txt"),
        ("M", None, "mod.txt"),
        ("R", Some("ren_old.txt"), "ren_new.txt"),
        ("T", None, "type"),
    ]
    .iter()
    .map(|(op, from, path)| {
        (
            (*op).to_owned(),
            from.map(str::to_owned),
            (*path).to_owned(),
        )
    })
    .collect();
    assert_eq!(got, want);

    let summary = &doc["summary"];
    for (key, n) in [
        ("create", 1),
        ("modify", 1),
        ("delete", 1),
        ("move", 1),
        ("copy", 1),
        ("type", 1),
        ("meta", 1),
    ] {
        assert_eq!(summary[key].as_u64(), Some(n), "summary.{key} in {summary}");
    }
    let bytes_to_copy = summary["bytes_to_copy"]
        .as_u64()
        .expect("summary.bytes_to_copy");
    let must_copy = ("new\n".len() + "modified content, longer\n".len()) as u64;
    assert!(
        bytes_to_copy >= must_copy,
        "bytes_to_copy {bytes_to_copy} < {must_copy}"
    );
}

#[test]
fn status_never_writes_to_dst_or_the_index() {
    let fx = Fixture::default();
    all_ops_scenario(&fx);
    let before = snapshot(&fx.dst);
    let ctimes_before = ctimes(&fx.dst);
    let index_before = fx.state_contents();
    assert!(
        !index_before.is_empty(),
        "sync should have written an index under XDG_STATE_HOME"
    );
    sleep(TICK);
    fx.status().code(0);
    fx.run("status", &["--json"]).code(0);
    assert_unchanged(&before, &snapshot(&fx.dst), "status");
    assert_eq!(
        ctimes_before,
        ctimes(&fx.dst),
        "status wrote to DST (ctimes changed)"
    );
    fx.assert_state_unchanged(&index_before, "status");
    // The pending changes are still pending.
    assert_eq!(fx.status_lines(), ALL_OPS_LINES);
}

#[test]
fn status_does_not_create_a_missing_dst() {
    let fx = Fixture::default();
    make_tree(&fx.src, 10);
    let lines = fx.status_lines();
    assert!(lines.iter().any(|l| l == "A f0000.dat"), "{lines:?}");
    assert!(!fx.dst.exists(), "status created DST");
    fx.run("status", &["--json"]).code(0);
    assert!(!fx.dst.exists(), "status --json created DST");
}

#[test]
fn dry_run_prints_status_lines_and_changes_nothing() {
    let fx = Fixture::default();
    all_ops_scenario(&fx);
    let before = snapshot(&fx.dst);
    let ctimes_before = ctimes(&fx.dst);
    let index_before = fx.state_contents();
    sleep(TICK);
    let a = fx.run("sync", &["--dry-run"]).code(0);
    assert_eq!(stdout_lines(&a), ALL_OPS_LINES);
    assert_unchanged(&before, &snapshot(&fx.dst), "sync --dry-run");
    assert_eq!(
        ctimes_before,
        ctimes(&fx.dst),
        "sync --dry-run wrote to DST"
    );
    fx.assert_state_unchanged(&index_before, "sync --dry-run");

    fx.sync().code(0);
    assert_mirror(&fx.src, &fx.dst);
}

#[test]
fn dry_run_does_not_create_a_missing_dst() {
    let fx = Fixture::default();
    make_tree(&fx.src, 10);
    let a = fx.run("sync", &["--dry-run"]).code(0);
    assert!(stdout_lines(&a).iter().any(|l| l == "A f0000.dat"));
    assert!(!fx.dst.exists(), "sync --dry-run created DST");
}

#[test]
fn log_file_records_operations_and_is_appended() {
    let fx = Fixture::default();
    let log = fx.root.join("dirsync.log");
    let log_arg = log.to_str().unwrap();
    write(&fx.src.join("a.txt"), "a\n");
    write(&fx.src.join("b/c.txt"), "c\n");
    fx.run("sync", &["--log-file", log_arg]).code(0);
    let first = fs::read_to_string(&log).expect("log file written");
    let lines = parse_log(&first);
    for path in ["a.txt", "b/c.txt"] {
        assert!(
            lines.contains(&LogLine::Op {
                letter: 'A',
                rest: path.to_owned()
            }),
            "no `A {path}` line in log:\n{first}"
        );
    }
    assert!(
        matches!(lines.last(), Some(LogLine::Summary(_))),
        "the pass should end with a summary line:\n{first}"
    );

    fs::remove_file(fx.src.join("a.txt")).unwrap();
    write(&fx.src.join("d.txt"), "d\n");
    fx.run("sync", &["--log-file", log_arg]).code(0);
    let second = fs::read_to_string(&log).unwrap();
    assert!(
        second.starts_with(&first),
        "the log file was not appended to"
    );
    let added = parse_log(&second[first.len()..]);
    for (letter, path) in [('D', "a.txt"), ('A', "d.txt")] {
        assert!(
            added.contains(&LogLine::Op {
                letter,
                rest: path.to_owned()
            }),
            "no `{letter} {path}` line in:\n{}",
            &second[first.len()..]
        );
    }
    assert_eq!(
        added
            .iter()
            .filter(|l| matches!(l, LogLine::Summary(_)))
            .count(),
        1,
        "one summary line per pass"
    );

    // A pass with nothing to do still appends exactly its summary line.
    fx.run("sync", &["--log-file", log_arg]).code(0);
    let third = fs::read_to_string(&log).unwrap();
    assert!(third.starts_with(&second));
    let added = parse_log(&third[second.len()..]);
    assert!(
        matches!(added.as_slice(), [LogLine::Summary(_)]),
        "a no-op pass should add one summary line, added: {added:?}"
    );
    assert_mirror(&fx.src, &fx.dst);
}

// =============================================================================================
// Bad input: exit 1, a message naming the path, nothing changed on disk
// =============================================================================================

/// Runs `sync`, `sync --dry-run` and `status` on SRC/DST and checks each exits 1, names one
/// of `named` on stderr and leaves the scratch area untouched.
#[track_caller]
fn assert_rejected(fx: &Fixture, src: &Path, dst: &Path, named: &[&Path]) {
    let mut names: Vec<String> = Vec::new();
    for p in named {
        names.push(p.display().to_string());
        if let Ok(c) = fs::canonicalize(p) {
            names.push(c.display().to_string());
        }
    }
    for args in [&["sync"][..], &["sync", "--dry-run"], &["status"]] {
        let before = fx.area_snapshot();
        let a = fx
            .cmd()
            .arg(args[0])
            .arg(src)
            .arg(dst)
            .args(&args[1..])
            .assert()
            .code(1);
        let err = stderr_of(&a);
        assert!(
            names.iter().any(|n| err.contains(n.as_str())),
            "`dirsync {}` should name one of {names:?} on stderr, got: {err:?}",
            args.join(" ")
        );
        assert_unchanged(
            &before,
            &fx.area_snapshot(),
            &format!("rejected `dirsync {}`", args.join(" ")),
        );
    }
}

#[test]
fn bad_input_src_missing() {
    let fx = Fixture::default();
    let src = fx.root.join("no-such-src");
    assert_rejected(&fx, &src, &fx.dst, &[&src]);
    assert!(!fx.dst.exists());
}

#[test]
fn bad_input_src_is_a_file() {
    let fx = Fixture::default();
    let src = fx.root.join("src-file");
    write(&src, "not a directory\n");
    assert_rejected(&fx, &src, &fx.dst, &[&src]);
    assert!(!fx.dst.exists());
}

#[test]
fn bad_input_dst_is_a_file() {
    let fx = Fixture::default();
    make_tree(&fx.src, 5);
    let dst = fx.root.join("dst-file");
    write(&dst, "not a directory\n");
    assert_rejected(&fx, &fx.src, &dst, &[&dst]);
}

#[test]
fn bad_input_src_equals_dst() {
    let fx = Fixture::default();
    make_tree(&fx.src, 5);
    assert_rejected(&fx, &fx.src, &fx.src, &[&fx.src]);
}

#[test]
fn bad_input_src_equals_dst_through_a_symlink() {
    let fx = Fixture::default();
    make_tree(&fx.src, 5);
    let link = fx.root.join("link-to-src");
    symlink(&fx.src, &link);
    assert_rejected(&fx, &fx.src, &link, &[&fx.src, &link]);
    assert_rejected(&fx, &link, &fx.src, &[&fx.src, &link]);
}

#[test]
fn bad_input_dst_inside_src() {
    let fx = Fixture::default();
    make_tree(&fx.src, 5);
    let dst = fx.src.join("replica");
    assert_rejected(&fx, &fx.src, &dst, &[&fx.src, &dst]);
    assert!(!dst.exists(), "DST inside SRC was created");
    let existing = fx.src.join("d1");
    assert_rejected(&fx, &fx.src, &existing, &[&fx.src, &existing]);
}

#[test]
fn bad_input_src_inside_dst() {
    let fx = Fixture::default();
    make_tree(&fx.dst, 5);
    let src = fx.dst.join("inner");
    write(&src.join("file"), "inner\n");
    assert_rejected(&fx, &src, &fx.dst, &[&src, &fx.dst]);
}

#[test]
fn usage_errors_exit_2() {
    let fx = Fixture::default();
    make_tree(&fx.src, 3);
    let src = fx.src.to_str().unwrap();
    let dst = fx.dst.to_str().unwrap();
    let cases: [&[&str]; 7] = [
        &[],
        &["sync"],
        &["sync", src],
        &["frobnicate", src, dst],
        &["sync", src, dst, "--no-such-flag"],
        &["watch", src, dst, "--interval", "not-a-duration"],
        &["sync", src, dst, "--max-delete", "many"],
    ];
    for args in cases {
        fx.cmd().args(args).assert().code(2);
    }
    assert!(!fx.dst.exists(), "a usage error created DST");
}

#[test]
fn help_for_the_tool_and_each_subcommand() {
    let fx = Fixture::default();
    let cases: [(&[&str], &[&str]); 5] = [
        (&["--help"], &["sync", "status", "watch", "verify"]),
        (
            &["sync", "--help"],
            &[
                "--dry-run",
                "--log-file",
                "--index",
                "--allow-empty-source",
                "--max-delete",
                "--reindex",
                "-v",
                "-q",
            ],
        ),
        (&["status", "--help"], &["--json", "--index", "-v", "-q"]),
        (
            &["watch", "--help"],
            &["--interval", "--log-file", "--index", "-v", "-q"],
        ),
        (&["verify", "--help"], &["--repair", "--index"]),
    ];
    for (args, words) in cases {
        let a = fx.cmd().args(args).assert().code(0);
        let out = String::from_utf8_lossy(&a.get_output().stdout).into_owned();
        for w in words {
            assert!(
                out.contains(w),
                "`dirsync {}` does not mention {w}:\n{out}",
                args.join(" ")
            );
        }
    }
}

// =============================================================================================
// Guard rails, index, verify (options listed in the synopsis)
// =============================================================================================

#[test]
fn emptied_source_is_refused_without_allow_empty_source() {
    let fx = Fixture::default();
    make_tree(&fx.src, 10);
    fx.sync().code(0);
    for entry in fs::read_dir(&fx.src).unwrap() {
        let p = entry.unwrap().path();
        if p.is_dir() {
            fs::remove_dir_all(p).unwrap();
        } else {
            fs::remove_file(p).unwrap();
        }
    }
    let before = snapshot(&fx.dst);
    fx.sync().code(1);
    assert_unchanged(
        &before,
        &snapshot(&fx.dst),
        "a sync stopped by the empty-source guard",
    );
    fx.run("sync", &["--allow-empty-source"]).code(0);
    assert_mirror(&fx.src, &fx.dst);
    assert_eq!(count_entries(&fx.dst), 0);
}

#[test]
fn max_delete_guard_rail() {
    let fx = Fixture::default();
    for i in 0..10 {
        write(&fx.src.join(format!("f{i}")), format!("{i}\n"));
    }
    fx.sync().code(0);
    for i in 0..5 {
        fs::remove_file(fx.src.join(format!("f{i}"))).unwrap();
    }
    let before = snapshot(&fx.dst);
    fx.run("sync", &["--max-delete", "2"]).code(1);
    assert_unchanged(
        &before,
        &snapshot(&fx.dst),
        "a sync stopped by --max-delete",
    );
    fx.run("sync", &["--max-delete", "5"]).code(0);
    assert_mirror(&fx.src, &fx.dst);
}

#[test]
fn index_lives_in_xdg_state_home_or_index_path() {
    let fx = Fixture::default();
    make_tree(&fx.src, 10);
    let index = fx.root.join("my.index");
    fx.run("sync", &["--index", index.to_str().unwrap()])
        .code(0);
    assert_mirror(&fx.src, &fx.dst);
    assert!(index.is_file(), "--index PATH was not used");
    assert!(
        fx.state_contents().is_empty(),
        "with --index nothing should be written under XDG_STATE_HOME"
    );
    let a = fx
        .run("status", &["--index", index.to_str().unwrap()])
        .code(0);
    assert!(stdout_lines(&a).is_empty());

    let other = Fixture::default();
    make_tree(&other.src, 10);
    other.sync().code(0);
    let dir = other.state.join("dirsync");
    assert!(
        dir.is_dir() && count_entries(&dir) > 0,
        "the default index should live in $XDG_STATE_HOME/dirsync/"
    );
}

#[test]
fn reindex_rebuilds_without_touching_dst() {
    let fx = Fixture::default();
    make_tree(&fx.src, 30);
    fx.sync().code(0);
    let before = snapshot(&fx.dst);
    let ctimes_before = ctimes(&fx.dst);
    sleep(TICK);
    fx.run("sync", &["--reindex"]).code(0);
    assert_unchanged(
        &before,
        &snapshot(&fx.dst),
        "sync --reindex of a mirrored DST",
    );
    assert_eq!(
        ctimes_before,
        ctimes(&fx.dst),
        "sync --reindex wrote to an already mirrored DST"
    );
    fx.assert_up_to_date();
}

#[test]
fn verify_passes_on_a_mirror_and_repair_fixes_silent_corruption() {
    let fx = Fixture::default();
    make_tree(&fx.src, 20);
    fx.sync().code(0);
    let before = snapshot(&fx.dst);
    fx.run("verify", &[]).code(0);
    assert_unchanged(&before, &snapshot(&fx.dst), "verify");

    sneaky_edit(&fx.dst.join("d2/s2/f0002.dat"));
    fx.run("verify", &["--repair"]);
    assert_mirror(&fx.src, &fx.dst);
}

// =============================================================================================
// Concurrency, watch, crashes
// =============================================================================================

#[test]
fn second_sync_fails_fast_while_a_watch_holds_the_lock() {
    let fx = Fixture::default();
    make_tree(&fx.src, 20);
    let mut cmd = fx.std_cmd();
    cmd.arg("watch")
        .arg(&fx.src)
        .arg(&fx.dst)
        .args(["--interval", "10s"]);
    let mut watch = Background::spawn(cmd, &fx.root.join("watch.stderr"));
    assert!(
        wait_until(Duration::from_secs(20), || is_mirror(&fx.src, &fx.dst)),
        "watch never mirrored SRC; stderr: {}",
        watch.stderr()
    );
    assert!(
        watch.try_status().is_none(),
        "watch exited: {}",
        watch.stderr()
    );

    let before = snapshot(&fx.dst);
    let started = Instant::now();
    let a = fx.sync().code(1);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the locked sync did not fail fast"
    );
    let err = stderr_of(&a).to_lowercase();
    assert!(
        ["lock", "another", "in use", "busy"]
            .iter()
            .any(|w| err.contains(w)),
        "the message should mention the lock / other process, got: {err:?}"
    );
    assert_unchanged(&before, &snapshot(&fx.dst), "a sync refused by the lock");

    fx.assert_up_to_date();

    // Ctrl-C stops it cleanly too.
    watch.signal(Signal::INT);
    let st = watch
        .wait_timeout(Duration::from_secs(10))
        .expect("watch stops on SIGINT");
    assert_eq!(
        st.code(),
        Some(0),
        "watch after SIGINT: {st}; stderr: {}",
        watch.stderr()
    );
}

#[test]
fn watch_replicates_changes_and_stops_cleanly_on_sigterm() {
    let fx = Fixture::default();
    make_tree(&fx.src, 10);
    let log = fx.root.join("watch.log");
    let mut cmd = fx.std_cmd();
    cmd.arg("watch")
        .arg(&fx.src)
        .arg(&fx.dst)
        .args(["--interval", "200ms", "--log-file"])
        .arg(&log);
    let mut watch = Background::spawn(cmd, &fx.root.join("watch.stderr"));
    assert!(
        wait_until(Duration::from_secs(10), || is_mirror(&fx.src, &fx.dst)),
        "first pass never mirrored SRC; stderr: {}",
        watch.stderr()
    );

    write(&fx.src.join("later/new.txt"), "added while watching\n");
    assert!(
        wait_until(Duration::from_secs(10), || is_mirror(&fx.src, &fx.dst)),
        "the new file never reached DST; stderr: {}",
        watch.stderr()
    );
    // Let a few idle passes run.
    sleep(Duration::from_millis(1000));
    assert!(
        watch.try_status().is_none(),
        "watch exited: {}",
        watch.stderr()
    );

    watch.signal(Signal::TERM);
    let st = watch
        .wait_timeout(Duration::from_secs(10))
        .expect("watch stops on SIGTERM");
    assert_eq!(
        st.code(),
        Some(0),
        "watch after SIGTERM: {st}; stderr: {}",
        watch.stderr()
    );
    assert_mirror(&fx.src, &fx.dst);

    let text = fs::read_to_string(&log).expect("watch wrote its log file");
    let lines = parse_log(&text);
    let added = lines
        .iter()
        .position(|l| {
            *l == LogLine::Op {
                letter: 'A',
                rest: "later/new.txt".to_owned(),
            }
        })
        .unwrap_or_else(|| panic!("no `A later/new.txt` in the log:\n{text}"));
    let summaries_before = lines[..added]
        .iter()
        .filter(|l| matches!(l, LogLine::Summary(_)))
        .count();
    let summaries_after = lines[added..]
        .iter()
        .filter(|l| matches!(l, LogLine::Summary(_)))
        .count();
    assert!(
        summaries_before >= 1,
        "the first pass wrote no summary line:\n{text}"
    );
    // The idle passes after it write none (the file may have taken two passes to settle).
    assert!(
        (1..=2).contains(&summaries_after),
        "expected a summary for the pass that added the file and none for the idle passes after it:\n{text}"
    );
}

/// `n_small` files of 0-64 KiB in 30 directories plus `n_big` files of 20 MiB.
fn make_large_tree(src: &Path, n_small: u64, n_big: u64) {
    for i in 0..n_small {
        let len = (i as usize * 7919) % (64 * 1024 + 1);
        write(
            &src.join(format!("d{:02}/f{i:04}.bin", i % 30)),
            bytes(i, len),
        );
    }
    // A random 64 KiB block, stamped per block so that all blocks and files differ.
    let block = bytes(99_999, 64 * 1024);
    for f in 0..n_big {
        let mut data = Vec::with_capacity(20 << 20);
        for b in 0..320u64 {
            let mut chunk = block.clone();
            chunk[..16].copy_from_slice(&[f.to_le_bytes(), b.to_le_bytes()].concat());
            data.extend_from_slice(&chunk);
        }
        write(&src.join(format!("big/huge{f}.bin")), data);
    }
}

/// Starts `sync` in the background, waits until DST holds at least `entries` entries, then
/// sends `sig` and returns the exit status.
fn interrupt_sync(fx: &Fixture, entries: usize, sig: Signal) -> std::process::ExitStatus {
    let mut cmd = fx.std_cmd();
    cmd.arg("sync").arg(&fx.src).arg(&fx.dst);
    let mut sync = Background::spawn(cmd, &fx.root.join("sync.stderr"));
    let deadline = Instant::now() + Duration::from_secs(60);
    while sync.try_status().is_none()
        && count_entries(&fx.dst) < entries
        && Instant::now() < deadline
    {
        sleep(Duration::from_millis(2));
    }
    let interrupted = sync.try_status().is_none();
    sync.signal(sig);
    let status = sync
        .wait_timeout(Duration::from_secs(20))
        .unwrap_or_else(|| panic!("sync did not stop after {sig:?}; stderr: {}", sync.stderr()));
    if !interrupted {
        eprintln!("note: the sync finished before it could be interrupted");
    }
    status
}

fn temp_leftovers(dst: &Path) -> Vec<String> {
    snapshot(dst)
        .keys()
        .filter(|k| k.windows(12).any(|w| w == b".dirsync-tmp"))
        .map(|k| show(k))
        .collect()
}

#[test]
fn kill_9_in_the_middle_of_a_large_sync_then_resync_recovers() {
    let fx = Fixture::default();
    make_large_tree(&fx.src, 3000, 3);

    // Killed twice: once early, once while resuming from the first crash.
    interrupt_sync(&fx, 200, Signal::KILL);
    let reached = count_entries(&fx.dst);
    interrupt_sync(&fx, reached + 800, Signal::KILL);

    fx.sync().code(0);
    let leftovers = temp_leftovers(&fx.dst);
    assert!(
        leftovers.is_empty(),
        "temporary files left in DST: {leftovers:?}"
    );
    assert_mirror(&fx.src, &fx.dst);
    fx.assert_up_to_date();
}

#[test]
fn sigterm_stops_a_sync_cleanly_with_exit_0() {
    let fx = Fixture::default();
    make_large_tree(&fx.src, 1500, 2);
    let status = interrupt_sync(&fx, 200, Signal::TERM);
    assert_eq!(
        status.code(),
        Some(0),
        "a sync stopped by SIGTERM: {status}"
    );
    let leftovers = temp_leftovers(&fx.dst);
    assert!(
        leftovers.is_empty(),
        "a cleanly stopped sync left temporary files: {leftovers:?}"
    );
    fx.sync().code(0);
    assert_mirror(&fx.src, &fx.dst);
    fx.assert_up_to_date();
}

#[test]
fn failed_paths_give_exit_3_and_are_named_on_stderr() {
    let fx = Fixture::default();
    make_tree(&fx.src, 20);
    write(&fx.src.join("locked/old.txt"), "old\n");
    fx.sync().code(0);

    write(&fx.src.join("locked/new.txt"), "cannot be created\n");
    write(&fx.src.join("d1/fine.txt"), "can be created\n");
    write(&fx.src.join("f0004.dat"), "modified\n");
    let Some(guard) = Immutable::set(&fx.dst.join("locked")) else {
        eprintln!("note: the filesystem has no immutable attribute; test skipped");
        return;
    };
    let a = fx.sync().code(3);
    let err = stderr_of(&a);
    assert!(
        err.contains("locked/new.txt"),
        "the failed path should be reported on stderr, got: {err:?}"
    );
    let outside = |snap: Snapshot| -> Snapshot {
        snap.into_iter()
            .filter(|(k, _)| !k.starts_with(b"locked"))
            .collect()
    };
    assert_snapshots_mirror(
        &outside(snapshot(&fx.src)),
        &outside(snapshot(&fx.dst)),
        "everything but the failed path should be mirrored",
    );
    let leftovers = temp_leftovers(&fx.dst);
    assert!(
        leftovers.is_empty(),
        "temporary files left in DST: {leftovers:?}"
    );
    assert!(
        parse_summary(&err).errors >= 1,
        "the summary should count the error"
    );

    drop(guard);
    fx.sync().code(0);
    assert_mirror(&fx.src, &fx.dst);
    fx.assert_up_to_date();
}

#[test]
fn damaged_index_is_fatal_and_reindex_recovers() {
    let fx = Fixture::default();
    make_tree(&fx.src, 20);
    fx.sync().code(0);
    let index_files: Vec<PathBuf> = fx
        .state_contents()
        .into_keys()
        .map(|k| fx.state.join(bytes_path(&k)))
        .collect();
    assert!(!index_files.is_empty(), "no index under XDG_STATE_HOME");
    for f in &index_files {
        fs::write(f, bytes(5, 8192)).unwrap();
    }
    write(&fx.src.join("new.txt"), "new\n");
    let before = snapshot(&fx.dst);
    let a = fx.sync().code(1);
    assert!(
        !stderr_of(&a).is_empty(),
        "a damaged index should be reported"
    );
    assert_unchanged(&before, &snapshot(&fx.dst), "a sync with a damaged index");

    fx.run("sync", &["--reindex"]).code(0);
    assert_mirror(&fx.src, &fx.dst);
    fx.assert_up_to_date();
}

#[test]
fn index_is_keyed_by_canonical_replica_path() {
    let fx = Fixture::default();
    make_tree(&fx.src, 10);
    fx.sync().code(0);
    let files_after_first = fx.state_contents().len();
    let link = fx.root.join("dst-link");
    symlink(&fx.dst, &link);
    let before = snapshot(&fx.dst);
    fx.cmd()
        .arg("sync")
        .arg(&fx.src)
        .arg(&link)
        .assert()
        .code(0);
    assert_unchanged(
        &before,
        &snapshot(&fx.dst),
        "a sync through a symlink to the replica",
    );
    assert_eq!(
        fx.state_contents().len(),
        files_after_first,
        "the same replica reached through a symlink got a second index"
    );
    assert_mirror(&fx.src, &fx.dst);
    assert!(
        fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink()
    );

    let dst2 = fx.root.join("dst2");
    fx.cmd()
        .arg("sync")
        .arg(&fx.src)
        .arg(&dst2)
        .assert()
        .code(0);
    assert_mirror(&fx.src, &dst2);
    assert!(
        fx.state_contents().len() > files_after_first,
        "a second replica should get its own index file"
    );
}

#[test]
fn relative_paths_are_resolved_against_the_working_directory() {
    let fx = Fixture::default();
    make_tree(&fx.src, 10);
    fx.cmd()
        .current_dir(&fx.root)
        .args(["sync", "src", "dst"])
        .assert()
        .code(0);
    assert_mirror(&fx.src, &fx.dst);
    fx.cmd()
        .current_dir(fx.src.join("d1"))
        .args(["status", "..", "../../dst/"])
        .assert()
        .code(0)
        .stdout("");
}

// =============================================================================================
// Random edit sequences
// =============================================================================================

const NAMES: [&str; 8] = ["a", "b", "c", "d/a", "d/b", "d/e/f", "e", "e/g"];
const CONTENTS: [&[u8]; 4] = [b"", b"x", b"hello world\n", &[7u8; 5000]];

#[derive(Clone, Debug)]
enum Edit {
    Write(usize, usize),
    Remove(usize),
    Rename(usize, usize),
    Symlink(usize, usize),
    HardLink(usize, usize),
    Mkdir(usize),
    Chmod(usize, bool),
    Touch(usize, u32),
}

fn edit_strategy() -> impl Strategy<Value = Edit> {
    let n = NAMES.len();
    prop_oneof![
        3 => (0..n, 0..CONTENTS.len()).prop_map(|(p, c)| Edit::Write(p, c)),
        2 => (0..n).prop_map(Edit::Remove),
        2 => (0..n, 0..n).prop_map(|(a, b)| Edit::Rename(a, b)),
        1 => (0..n, 0..n).prop_map(|(p, t)| Edit::Symlink(p, t)),
        1 => (0..n, 0..n).prop_map(|(a, b)| Edit::HardLink(a, b)),
        1 => (0..n).prop_map(Edit::Mkdir),
        1 => (0..n, any::<bool>()).prop_map(|(p, x)| Edit::Chmod(p, x)),
        1 => (0..n, any::<u32>()).prop_map(|(p, t)| Edit::Touch(p, t)),
    ]
}

/// Applies one edit to SRC; edits that make no sense for the current tree are skipped.
fn apply(src: &Path, edit: &Edit) {
    let path = |i: usize| -> PathBuf { src.join(NAMES[i]) };
    let parent = |p: &Path| {
        let _ = fs::create_dir_all(p.parent().unwrap());
    };
    let _ = match edit {
        Edit::Write(p, c) => {
            parent(&path(*p));
            fs::write(path(*p), CONTENTS[*c])
        }
        Edit::Remove(p) => fs::remove_file(path(*p)).or_else(|_| fs::remove_dir_all(path(*p))),
        Edit::Rename(a, b) => {
            parent(&path(*b));
            fs::rename(path(*a), path(*b))
        }
        Edit::Symlink(p, t) => {
            parent(&path(*p));
            std::os::unix::fs::symlink(NAMES[*t], path(*p))
        }
        Edit::HardLink(a, b) => {
            parent(&path(*b));
            if path(*a).is_symlink() || !path(*a).is_file() {
                Ok(())
            } else {
                fs::hard_link(path(*a), path(*b))
            }
        }
        Edit::Mkdir(p) => fs::create_dir_all(path(*p)),
        Edit::Chmod(p, x) => {
            if path(*p).is_symlink() {
                Ok(())
            } else {
                use std::os::unix::fs::PermissionsExt;
                fs::set_permissions(
                    path(*p),
                    fs::Permissions::from_mode(if *x { 0o755 } else { 0o640 }),
                )
            }
        }
        Edit::Touch(p, t) => {
            let ft = filetime::FileTime::from_unix_time(
                1_500_000_000 + i64::from(*t % 1_000_000),
                *t % 1_000_000_000,
            );
            filetime::set_symlink_file_times(path(*p), ft, ft)
        }
    };
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 12,
        max_shrink_iters: 64,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn random_edit_sequences_always_converge(
        rounds in prop::collection::vec(prop::collection::vec(edit_strategy(), 1..8), 1..4)
    ) {
        let fx = Fixture::default();
        for edits in &rounds {
            for edit in edits {
                apply(&fx.src, edit);
            }
            fx.sync().code(0);
            assert_mirror(&fx.src, &fx.dst);
            fx.assert_up_to_date();
        }
    }
}

#[test]
fn watch_keeps_going_when_a_guard_rail_refuses_a_pass() {
    let fx = Fixture::default();
    make_tree(&fx.src, 10);
    fx.sync().code(0);
    let before = snapshot(&fx.dst);
    // The source "unmounts": an empty directory where the tree was.
    let away = fx.root.join("src.away");
    fs::rename(&fx.src, &away).unwrap();
    fs::create_dir(&fx.src).unwrap();

    let mut cmd = fx.std_cmd();
    cmd.arg("watch")
        .arg(&fx.src)
        .arg(&fx.dst)
        .args(["--interval", "200ms"]);
    let mut watch = Background::spawn(cmd, &fx.root.join("watch.stderr"));
    assert!(
        wait_until(Duration::from_secs(10), || watch
            .stderr()
            .contains("--allow-empty-source")),
        "no refusal reported; stderr: {}",
        watch.stderr()
    );
    sleep(Duration::from_millis(600));
    assert!(
        watch.try_status().is_none(),
        "watch exited: {}",
        watch.stderr()
    );
    assert_unchanged(&before, &snapshot(&fx.dst), "refused watch passes");

    // The source comes back, with one more file: the next pass syncs it.
    fs::remove_dir(&fx.src).unwrap();
    fs::rename(&away, &fx.src).unwrap();
    write(&fx.src.join("back.txt"), "back\n");
    assert!(
        wait_until(Duration::from_secs(10), || is_mirror(&fx.src, &fx.dst)),
        "watch never synced after the source came back; stderr: {}",
        watch.stderr()
    );
    watch.signal(Signal::TERM);
    let st = watch
        .wait_timeout(Duration::from_secs(10))
        .expect("watch stops on SIGTERM");
    assert_eq!(
        st.code(),
        Some(0),
        "the last pass synced: refused passes before it are history: {st}"
    );
}

#[test]
fn index_and_log_file_inside_a_tree_are_refused_and_nothing_changes() {
    let fx = Fixture::default();
    make_tree(&fx.src, 5);
    fx.sync().code(0);
    let (src_before, dst_before) = (snapshot(&fx.src), snapshot(&fx.dst));
    let cases = [
        ("--index", fx.src.join("idx.redb"), "source"),
        ("--index", fx.dst.join("sub/idx.redb"), "replica"),
        ("--log-file", fx.src.join("sync.log"), "source"),
        ("--log-file", fx.dst.join("sync.log"), "replica"),
    ];
    for (flag, path, tree) in cases {
        for cmd in ["sync", "status", "watch"] {
            let out = fx
                .std_cmd()
                .arg(cmd)
                .arg(&fx.src)
                .arg(&fx.dst)
                .arg(flag)
                .arg(&path)
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(
                out.status.code(),
                Some(1),
                "{cmd} {flag} {}: {stderr}",
                path.display()
            );
            assert!(
                stderr.contains(&path.display().to_string()) && stderr.contains(tree),
                "{cmd} {flag}: the message names the file and the tree: {stderr}"
            );
        }
    }
    assert_unchanged(&src_before, &snapshot(&fx.src), "source");
    assert_unchanged(&dst_before, &snapshot(&fx.dst), "replica");
}
