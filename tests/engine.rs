//! The real pass (`engine::Engine`: merge, index cursors, hashing, plan, apply) over backends
//! other than two local directories: a local source into a `MemoryReplica`, and a
//! `MemoryReplica` as the source of a local replica. Each side is checked against a read-back
//! that does not go through the trait under test, and a second pass must find nothing to do
//! and read no file.

mod common;

use std::os::fd::AsFd;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use common::*;
use dirsync::config::Config;
use dirsync::engine::{Engine, Report};
use dirsync::entry::{Content, Entry, Kind, Meta, RelPath, Time};
use dirsync::index::{Index, Roots};
use dirsync::oplog::OpLog;
use dirsync::replica::local::LocalReplica;
use dirsync::replica::memory::MemoryReplica;
use dirsync::replica::probe::FsTraits;
use dirsync::replica::root::ReplicaRoot;
use dirsync::replica::{self, Replica};
use dirsync::scan::{self, Root, Side};
use dirsync::source::{LocalSource, Source};

fn p(s: &str) -> RelPath {
    RelPath::from_bytes(s.as_bytes()).unwrap()
}

fn index_for(cfg: &Config) -> Index {
    let roots = Roots {
        source: &cfg.roots.source,
        replica: &cfg.roots.replica,
    };
    Index::open(&cfg.index, &roots, false).unwrap()
}

fn sync(cfg: &Config, index: &Index, source: &dyn Source, replica: &dyn Replica) -> Report {
    let engine = Engine::new(cfg, source, Some(replica), FsTraits::default());
    let report = engine
        .sync(index, &mut OpLog::default(), &AtomicBool::new(false))
        .unwrap();
    assert!(
        report.outcome.errors.is_empty() && report.scan_errors.is_empty(),
        "{:?} {:?}",
        report.outcome.errors,
        report.scan_errors
    );
    report
}

/// A second pass over an unchanged pair: no operation, no change, no file read.
fn assert_idle(report: &Report) {
    assert!(report.plan.ops.is_empty(), "{:#?}", report.plan.ops);
    assert!(report.plan.items.is_empty(), "{:#?}", report.plan.items);
    assert_eq!(
        (report.files_hashed, report.bytes_hashed),
        (0, 0),
        "the second pass read files again"
    );
}

/// What a mirror must agree on, one line per path: kind, content (hash or target), mode,
/// mtime, hard-link leader. Owners are not replicated (not `--owners`).
fn view(entries: &[(RelPath, Entry)]) -> Vec<String> {
    entries
        .iter()
        .map(|(path, e)| {
            let content = match &e.content {
                Content::File { size, hash } => {
                    let h = hash.expect("every file hashed");
                    format!("file {size} {:02x}{:02x}{:02x}", h[0], h[1], h[2])
                }
                Content::Dir { .. } => "dir".into(),
                Content::Symlink { target } => format!("-> {}", show(target)),
                Content::Special => "special".into(),
            };
            // A symlink's mode is whatever the filesystem gives it.
            let mode = match e.content {
                Content::Symlink { .. } => 0,
                _ => e.meta.mode & 0o7777,
            };
            let link = e
                .link
                .as_ref()
                .map(|l| format!(" = {l}"))
                .unwrap_or_default();
            let (sec, nsec) = (e.meta.mtime.sec, e.meta.mtime.nsec);
            format!("{path} {content} {mode:o} {sec}.{nsec:09}{link}")
        })
        .collect()
}

/// A local tree read back by path, every file hashed (not through a backend).
fn local_view(root: &Path, side: Side) -> Vec<String> {
    let mut tree = scan::walk(root, side);
    let all: Vec<usize> = tree.unhashed().collect();
    scan::hash_files(root, &mut tree, &all);
    assert!(tree.problems.is_empty(), "{:?}", tree.problems);
    view(&tree.entries)
}

/// A source with every kind of node but hard links ([`local_link`]): nested directories,
/// names that sort around '/', an empty file, a symlink, a larger file; mtimes in the past.
fn local_source(src: &Path) {
    mkdir(&src.join("a/b"));
    mkdir(&src.join("a-b"));
    write(&src.join("a/b/deep"), b"deep");
    write(&src.join("a/x"), b"x");
    write(&src.join("a-b/y"), b"y");
    write(&src.join("a.c"), b"c");
    write(&src.join("empty"), b"");
    write(&src.join("big"), bytes(7, 300_000));
    symlink("a/x", &src.join("link"));
    set_mode(&src.join("a.c"), 0o600);
    for (i, f) in ["a/b/deep", "a/x", "a-b/y", "a.c", "empty", "big"]
        .iter()
        .enumerate()
    {
        set_mtime(&src.join(f), 1_600_000_000 + i as i64, 123_456_789);
    }
    for d in ["a/b", "a", "a-b", ""] {
        set_mtime(&src.join(d), 1_500_000_000, 5);
    }
    past_racy_window();
}

/// Waits until stamps set now are outside the racy window (20 ms here), so that records
/// taken from now on are trusted by the next pass.
fn past_racy_window() {
    std::thread::sleep(Duration::from_millis(50));
}

/// A second link to `a/x`, `a/x2`. Linking changes the ctime of the inode, so the records of
/// `a/x` on both sides are stale after it: the next pass hashes it again.
fn local_link(src: &Path) {
    std::fs::hard_link(src.join("a/x"), src.join("a/x2")).unwrap();
    set_mtime(&src.join("a"), 1_500_000_000, 5);
    past_racy_window();
}

/// Syncs an unchanged pair twice more: the first may hash files whose records a link made
/// stale (with no operation), the second must be idle. Each waits out the racy window of the
/// stamps the pass before it made.
fn assert_settles(cfg: &Config, index: &Index, source: &dyn Source, replica: &dyn Replica) {
    past_racy_window();
    let again = sync(cfg, index, source, replica);
    assert!(again.plan.ops.is_empty(), "{:#?}", again.plan.ops);
    past_racy_window();
    assert_idle(&sync(cfg, index, source, replica));
}

#[test]
fn a_local_source_is_mirrored_into_a_memory_replica_and_a_second_pass_does_nothing() {
    let fx = Fixture::default();
    local_source(&fx.src);
    let cfg = fx.config();
    let index = index_for(&cfg);
    let fd = scan::open_root(&cfg.roots.source).unwrap();
    let source = LocalSource::new(Root {
        path: &cfg.roots.source,
        fd: fd.as_fd(),
    });
    let mem = MemoryReplica::new(false);

    let first = sync(&cfg, &index, &source, &mem);
    assert!(first.outcome.done.total() > 0);
    assert_eq!(view(&mem.tree()), local_view(&fx.src, Side::Source));
    assert_eq!(mem.read(&p("big")).unwrap(), bytes(7, 300_000));
    assert_eq!(
        Source::dir_meta(&mem, &p("a")).unwrap().mtime,
        Time {
            sec: 1_500_000_000,
            nsec: 5
        }
    );

    assert_idle(&sync(&cfg, &index, &source, &mem));

    // A change and a new hard link in the source are carried over.
    write(&fx.src.join("a/x"), b"X!");
    set_mtime(&fx.src.join("a/x"), 1_600_000_000, 0);
    local_link(&fx.src);
    let third = sync(&cfg, &index, &source, &mem);
    assert!(!third.plan.ops.is_empty());
    assert_eq!(mem.read(&p("a/x2")).unwrap(), b"X!", "the hard link");
    assert_eq!(view(&mem.tree()), local_view(&fx.src, Side::Source));
    assert_settles(&cfg, &index, &source, &mem);
}

fn meta(mode: u32, sec: i64) -> Meta {
    Meta {
        mode,
        mtime: Time { sec, nsec: 250 },
        uid: rustix::process::geteuid().as_raw(),
        gid: rustix::process::getegid().as_raw(),
    }
}

fn put(mem: &MemoryReplica, path: &str, data: &[u8], m: Meta) {
    let mut check = |_: &_, _| Ok(());
    mem.write_file(&p(path), &mut &data[..], &m, &mut check)
        .unwrap();
}

/// The tree of [`local_source`], built in memory through the replica trait; [`memory_link`]
/// adds the hard link.
fn memory_source() -> MemoryReplica {
    let mem = MemoryReplica::new(false);
    for d in ["a", "a/b", "a-b"] {
        mem.mkdir(&p(d)).unwrap();
    }
    put(&mem, "a/b/deep", b"deep", meta(0o644, 1_600_000_001));
    put(&mem, "a/x", b"x", meta(0o644, 1_600_000_002));
    put(&mem, "a-b/y", b"y", meta(0o644, 1_600_000_003));
    put(&mem, "a.c", b"c", meta(0o600, 1_600_000_004));
    put(&mem, "empty", b"", meta(0o644, 1_600_000_005));
    put(&mem, "big", &bytes(7, 300_000), meta(0o644, 1_600_000_006));
    mem.symlink(&p("link"), b"a/x", &meta(0o777, 1_600_000_007))
        .unwrap();
    for d in ["a/b", "a", "a-b", ""] {
        mem.set_meta(&p(d), Kind::Dir, &meta(0o755, 1_500_000_000))
            .unwrap();
    }
    mem
}

/// The memory twin of [`local_link`].
fn memory_link(mem: &MemoryReplica) {
    mem.hard_link(&p("a/x"), &p("a/x2")).unwrap();
    mem.set_meta(&p("a"), Kind::Dir, &meta(0o755, 1_500_000_000))
        .unwrap();
}

#[test]
fn a_memory_source_is_mirrored_into_a_local_replica_and_a_second_pass_does_nothing() {
    let fx = Fixture::default();
    let mem = memory_source();
    let held = ReplicaRoot::create(&fx.dst).unwrap();
    let cfg = fx.config();
    let index = index_for(&cfg);
    let replica = LocalReplica::held(&held, false).unwrap();

    let first = sync(&cfg, &index, &mem, &replica);
    assert!(first.outcome.done.total() > 0);
    assert_eq!(local_view(&fx.dst, Side::Replica), view(&mem.tree()));
    assert_eq!(
        std::fs::read(fx.dst.join("big")).unwrap(),
        bytes(7, 300_000)
    );
    // Read back through the trait as well.
    let mut back = Vec::new();
    std::io::Read::read_to_end(&mut replica.open(&p("a-b/y")).unwrap(), &mut back).unwrap();
    assert_eq!(back, b"y");

    assert_idle(&sync(&cfg, &index, &mem, &replica));

    // A change and a hard link in the memory source are carried over.
    put(&mem, "a/b/deep", b"deeper", meta(0o640, 1_600_000_100));
    mem.set_meta(&p("a/b"), Kind::Dir, &meta(0o755, 1_500_000_000))
        .unwrap();
    memory_link(&mem);
    let third = sync(&cfg, &index, &mem, &replica);
    assert!(!third.plan.ops.is_empty());
    assert_eq!(std::fs::read(fx.dst.join("a/b/deep")).unwrap(), b"deeper");
    assert_eq!(ino(&fx.dst.join("a/x")), ino(&fx.dst.join("a/x2")));
    assert_eq!(local_view(&fx.dst, Side::Replica), view(&mem.tree()));
    assert_settles(&cfg, &index, &mem, &replica);
}

#[test]
fn memory_and_local_walks_list_one_tree_alike_in_canonical_order() {
    let fx = Fixture::default();
    local_source(&fx.src);
    local_link(&fx.src);
    let mem = memory_source();
    memory_link(&mem);
    let paths =
        |t: &scan::Tree| -> Vec<String> { t.entries.iter().map(|(p, _)| p.to_string()).collect() };
    let fd = scan::open_root(&fx.src).unwrap();
    let local = LocalSource::new(Root {
        path: &fx.src,
        fd: fd.as_fd(),
    });
    let from_local = scan::collect(|sink| local.walk(None, false, sink));
    let from_memory = replica::walk_all(&mem);
    let want = [
        ".", "a", "a-b", "a-b/y", "a.c", "a/b", "a/b/deep", "a/x", "a/x2", "big", "empty", "link",
    ];
    assert_eq!(paths(&from_memory), want);
    assert_eq!(paths(&from_local), want);
    // Stat only: no file is read by a walk, except that an empty file's hash is known.
    for t in [&from_local, &from_memory] {
        let hashed: Vec<String> = t
            .entries
            .iter()
            .filter(|(_, e)| e.file_hash().is_some())
            .map(|(p, _)| p.to_string())
            .collect();
        assert_eq!(hashed, ["empty"]);
        assert_eq!(t.entries[8].1.link, Some(p("a/x")), "a/x2 leads to a/x");
    }
    // Hashing through the trait fills in what the read-back has.
    let mut tree = from_memory;
    let all: Vec<usize> = tree.unhashed().collect();
    Replica::hash(&mem, &mut tree, &all);
    assert_eq!(view(&tree.entries), view(&mem.tree()));
    assert_eq!(tree.hashed_files, 6);
}

#[test]
fn a_memory_source_holds_back_names_equal_but_for_case_and_the_avoided_directory() {
    let mem = MemoryReplica::new(false);
    mem.mkdir(&p("Read.me")).unwrap();
    put(&mem, "Read.me/inner", b"1", meta(0o644, 1_600_000_000));
    put(&mem, "read.ME", b"2", meta(0o644, 1_600_000_000));
    mem.mkdir(&p("keep")).unwrap();
    mem.mkdir(&p("keep/replica")).unwrap();
    put(&mem, "keep/replica/f", b"3", meta(0o644, 1_600_000_000));
    let avoid = match mem.node(&p("keep/replica")).unwrap() {
        dirsync::replica::memory::Node::Dir { ino, .. } => (dirsync::replica::memory::DEV, ino),
        other => panic!("{other:?}"),
    };
    let tree = scan::collect(|sink| Source::walk(&mem, Some(avoid), true, sink));
    let paths: Vec<String> = tree.entries.iter().map(|(p, _)| p.to_string()).collect();
    assert_eq!(paths, [".", "keep"]);
    let unknown: Vec<String> = tree.unknown.iter().map(|p| p.to_string()).collect();
    assert_eq!(unknown, ["Read.me", "keep/replica", "read.ME"]);
    assert!(tree.problems[0].error.to_string().contains("only in case"));
    assert!(
        tree.problems[1]
            .error
            .to_string()
            .contains("is the replica")
    );
    // Without the guards every node is listed.
    let tree = scan::collect(|sink| Source::walk(&mem, None, false, sink));
    assert_eq!(tree.entries.len(), 7);
}

#[test]
fn a_memory_source_file_replaced_since_the_scan_is_not_read() {
    let mem = memory_source();
    let fp = mem.stat(&p("a/x")).unwrap();
    let scanned = fp.node().expect("a memory file has an inode");
    let file = Source::open(&mem, &p("a/x"), Some(scanned)).unwrap();
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut file.reader(), &mut bytes).unwrap();
    assert_eq!(bytes, b"x");
    file.check_unchanged(1).unwrap();
    assert!(file.check_unchanged(0).is_err(), "a short read counts");
    put(&mem, "a/x", b"other", meta(0o644, 1_600_000_000));
    let e = Source::open(&mem, &p("a/x"), Some(scanned)).err().unwrap();
    assert!(dirsync::source::is_changed(&e), "{e}");
    mem.remove(&p("a-b/y"), Kind::File).unwrap();
    let e = Source::open(&mem, &p("a-b/y"), None).err().unwrap();
    assert!(dirsync::source::is_vanished(&e), "{e}");
    // A symlink on the way is never followed.
    mem.symlink(&p("via"), b"a", &meta(0o777, 1)).unwrap();
    let e = Source::open(&mem, &p("via/x"), None).err().unwrap();
    assert!(dirsync::source::is_changed(&e), "{e}");
}

/// The real pass into a memory replica of each profile (local POSIX, SFTP-like,
/// object-store-like): every file lands with its bytes, what the profile cannot hold is
/// reported as unsupported (nothing else fails), and the next passes settle to idle.
#[test]
fn the_real_pass_settles_into_a_memory_replica_of_every_profile() {
    use dirsync::error::ErrorKind;
    use dirsync::replica::memory::Profile;
    for profile in [Profile::Posix, Profile::SftpLike, Profile::ObjectStoreLike] {
        let fx = Fixture::default();
        local_source(&fx.src);
        local_link(&fx.src);
        let cfg = fx.config();
        let index = index_for(&cfg);
        let fd = scan::open_root(&cfg.roots.source).unwrap();
        let source = LocalSource::new(Root {
            path: &cfg.roots.source,
            fd: fd.as_fd(),
        });
        let mem = MemoryReplica::with_profile(profile, false);
        let pass = || {
            let engine = Engine::new(&cfg, &source, Some(&mem), FsTraits::default());
            let stop = AtomicBool::new(false);
            let report = engine.sync(&index, &mut OpLog::default(), &stop).unwrap();
            let errors = report.outcome.errors.iter().chain(&report.scan_errors);
            for e in errors {
                assert_eq!(e.kind, ErrorKind::Unsupported, "{profile:?}: {e}");
            }
            report
        };
        let first = pass();
        assert!(first.outcome.done.total() > 0, "{profile:?}");
        for f in ["a/b/deep", "a/x", "a/x2", "a-b/y", "a.c", "empty", "big"] {
            let want = std::fs::read(fx.src.join(f)).unwrap();
            assert_eq!(mem.read(&p(f)).as_ref(), Some(&want), "{profile:?}: {f}");
        }
        past_racy_window();
        let again = pass();
        assert!(
            again.plan.ops.is_empty(),
            "{profile:?}: {:#?}",
            again.plan.ops
        );
        past_racy_window();
        let idle = pass();
        assert!(
            idle.plan.ops.is_empty(),
            "{profile:?}: {:#?}",
            idle.plan.ops
        );
        assert_eq!(
            idle.files_hashed, 0,
            "{profile:?}: the pass read files again"
        );
    }
}
