//! Scans both trees of a pass in bounded memory and keeps only what needs a closer look.
//!
//! Four streams in canonical order are merged: the source walk and the replica walk (one thread
//! each), each read in step with its recorded table (see [`Cursor`]). The main thread joins the
//! two walks path by path. A path is kept only when the two sides may differ: one side lacks
//! it, kinds, metadata, link or symlink target differ, or a file's content hash is not known on
//! one side yet. Every kept path brings its ancestors along (the planner restores a parent's
//! metadata, and a directory's tree hash must cover every kept path below it), and the root is
//! always kept. Everything else is dropped as soon as it
//! has been compared, so a pass over an unchanged tree holds a few directories, not the tree.
//!
//! The kept paths form two partial trees, in canonical order and closed under taking parents,
//! that hold every path the planner needs: a path that differs, its ancestors, and (for an added
//! or deleted directory) its whole subtree, since every path below it differs too. The tree
//! hashes of the two partial trees are equal for a directory only when its kept paths are the
//! same on both sides, so the diff's subtree skip stays correct on them.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::time::Instant;

use crate::entry::{Content, Entry, Hash, RelPath};
use crate::error::Result;
use crate::event::{Event, PROGRESS_INTERVAL, Sink};
use crate::index::{Cursor, Snapshot, Table};
use crate::replica::TMP_PREFIX;
use crate::replica::probe::FsTraits;
use crate::replica::{Capabilities, Replica};
use crate::scan::{self, Tree};
use crate::source::Source;

/// Entries per message from a walking thread.
const BATCH: usize = 512;
/// Messages in flight per walking thread.
const DEPTH: usize = 4;

/// What the merged scan of one side holds.
#[derive(Debug, Default)]
pub struct Side {
    /// The kept paths of this side (entries of `tree`), and what else the walk found.
    pub tree: Tree,
    /// Records of the side's table for paths the walk did not see, or that are no longer files.
    pub stale: Vec<(RelPath, Entry)>,
    /// How many paths the walk saw.
    pub seen: usize,
    /// The size of every file seen, kept or not: an unhashed file can only match a file of the
    /// same size on the other side.
    pub sizes: Sizes,
}

impl Side {
    /// Counts one entry the walk saw (if this side has the path).
    fn count(&mut self, e: Option<&Entry>) {
        if let Some(e) = e {
            self.seen += 1;
            if let Content::File { size, .. } = e.content {
                self.sizes.insert(size);
            }
        }
    }
}

/// A set of file sizes: a bitmap below 1 MiB, where most files are, and a hash set above.
#[derive(Debug, Default)]
pub struct Sizes {
    small: Vec<u64>,
    large: HashSet<u64>,
}

const SMALL: u64 = 1 << 20;

impl Sizes {
    pub fn insert(&mut self, n: u64) {
        if n >= SMALL {
            self.large.insert(n);
            return;
        }
        if self.small.is_empty() {
            self.small = vec![0; (SMALL / 64) as usize];
        }
        self.small[(n / 64) as usize] |= 1 << (n % 64);
    }

    pub fn contains(&self, n: u64) -> bool {
        match n < SMALL {
            true => self
                .small
                .get((n / 64) as usize)
                .is_some_and(|w| w & (1 << (n % 64)) != 0),
            false => self.large.contains(&n),
        }
    }
}

/// Both sides of a merged scan.
#[derive(Debug, Default)]
pub struct Merged {
    pub src: Side,
    pub dst: Side,
    pub contents: Contents,
}

/// What the merge keeps of the replica files it drops, to find copy sources among them.
#[derive(Debug, Default)]
pub struct Contents {
    /// The first four bytes of every known replica file hash, sorted: a cheap test of whether a
    /// wanted content may be somewhere in the replica.
    prefixes: Vec<u32>,
    /// Dropped (unchanged) replica files of at least [`LARGE`] bytes, by hash: the copies worth
    /// finding are large, and large files are few.
    large: HashMap<Hash, (RelPath, Entry)>,
    /// More than [`MAX_LARGE`] such files were seen; `large` was given up.
    overflow: bool,
}

/// Files from this size on are remembered by [`Contents`].
pub const LARGE: u64 = 1 << 20;
const MAX_LARGE: usize = 4096;

/// Where a wanted content may be among the dropped replica files.
#[derive(Debug, PartialEq)]
pub enum Lookup<'a> {
    Found(&'a (RelPath, Entry)),
    Absent,
    /// Only the recorded replica table can tell.
    Unknown,
}

impl Contents {
    /// Looks up content `h` of `size` bytes among the dropped replica files.
    pub fn lookup(&self, h: &Hash, size: u64) -> Lookup<'_> {
        if self.prefixes.binary_search(&prefix(h)).is_err() {
            return Lookup::Absent;
        }
        match (size >= LARGE && !self.overflow, self.large.get(h)) {
            (true, Some(found)) => Lookup::Found(found),
            (true, None) => Lookup::Absent,
            (false, _) => Lookup::Unknown,
        }
    }

    fn add(&mut self, path: &RelPath, e: &Entry, dropped: bool) {
        let Content::File {
            size,
            hash: Some(h),
        } = e.content
        else {
            return;
        };
        self.prefixes.push(prefix(&h));
        if dropped && size >= LARGE && !self.overflow {
            self.large.insert(h, (path.clone(), e.clone()));
            if self.large.len() > MAX_LARGE {
                self.overflow = true;
                self.large = HashMap::new();
            }
        }
    }
}

fn prefix(h: &Hash) -> u32 {
    u32::from_le_bytes([h[0], h[1], h[2], h[3]])
}

/// Walks `source` and `replica` (`None`: a replica that does not exist yet, which is empty)
/// through their traits, one thread each, and merges them with the tables of `snapshot`. `fs`
/// is what the replica's filesystem keeps (with the declared precision,
/// [`Capabilities::traits`]) and `caps` what the replica declares: source entries are compared
/// as it would keep them ([`Capabilities::keep`]), and a replica entry is racily clean for at
/// least its timestamp grain. Tells `sink` now and then how many entries each walk has seen
/// ([`Event::Scanned`]).
pub fn scan(
    source: &dyn Source,
    replica: Option<&dyn Replica>,
    snapshot: &Snapshot,
    owners: bool,
    (fs, caps): (FsTraits, Capabilities),
    sink: &mut dyn Sink,
) -> Result<Merged> {
    let src_cursor = snapshot.cursor(Table::Source)?;
    let dst_cursor = snapshot.cursor(Table::Replica)?;
    let (src_tx, src_rx) = sync_channel(DEPTH);
    let (dst_tx, dst_rx) = sync_channel(DEPTH);
    // The source walk never enters the replica (a mount can show it there).
    let avoid = replica.and_then(|r| r.identity());
    let fold = fs.case_insensitive;
    std::thread::scope(|s| {
        let src = s.spawn(move || {
            let walk = |found: Found| source.walk(avoid, fold, found);
            walk_side(walk, scan::Side::Source, src_cursor, src_tx, (fs, caps))
        });
        let dst = s.spawn(move || match replica {
            Some(r) => {
                let walk = |found: Found| r.walk(found);
                walk_side(walk, scan::Side::Replica, dst_cursor, dst_tx, (fs, caps))
            }
            None => missing_side(dst_cursor),
        });
        let progress = RefCell::new(Progress::new(sink));
        let (src_in, dst_in) = (
            Stream::new(src_rx, 0, &progress),
            Stream::new(dst_rx, 1, &progress),
        );
        let mut merged = join(src_in, dst_in, owners);
        let (src_tree, src_stale) = src.join().expect("the source walk does not panic")?;
        let (dst_tree, dst_stale) = dst.join().expect("the replica walk does not panic")?;
        merged.src.stale = src_stale;
        merged.dst.stale = dst_stale;
        for (side, tree) in [(&mut merged.src, src_tree), (&mut merged.dst, dst_tree)] {
            let kept = std::mem::take(&mut side.tree.entries);
            side.tree = tree;
            side.tree.entries = kept;
        }
        Ok(merged)
    })
}

type Batch = Vec<(RelPath, Entry)>;

/// Where a walk hands each entry it finds.
type Found<'s> = &'s mut dyn FnMut(&scan::Windows, RelPath, Entry);

/// Runs `walk` over one tree, reusing recorded hashes whose fingerprint still matches, and
/// sends the entries in batches. Returns what else the walk found and the stale records.
fn walk_side(
    walk: impl FnOnce(Found) -> Tree,
    side: scan::Side,
    mut cursor: Cursor,
    tx: SyncSender<Batch>,
    (fs, caps): (FsTraits, Capabilities),
) -> Result<(Tree, Vec<(RelPath, Entry)>)> {
    let mut stale = Vec::new();
    let mut failed = None;
    let mut batch = Vec::with_capacity(BATCH);
    let mut sink = |w: &scan::Windows, path: RelPath, mut e: Entry| {
        if failed.is_some() {
            return;
        }
        if side == scan::Side::Source {
            caps.keep(&mut e, &fs);
        }
        match cursor.seek(&path, &mut |p, rec| stale.push((p, rec))) {
            Ok(Some(rec)) => {
                let window = match side {
                    scan::Side::Source => w.for_entry(&e),
                    // A change within one grain of the recorded stamp leaves the stamp as it was.
                    scan::Side::Replica => w
                        .for_entry(&e)
                        .max(i128::from(fs.mtime_grain_ns) + crate::entry::RACY_WINDOW_FINE_NS),
                };
                if !scan::reuse_cached(&mut e, &rec, window) {
                    stale.push((path.clone(), rec));
                }
            }
            Ok(None) => {}
            Err(err) => failed = Some(err),
        }
        batch.push((path, e));
        // A closed receiver means the pass is over; the rest of the walk is not needed.
        if batch.len() == BATCH && tx.send(std::mem::take(&mut batch)).is_ok() {
            batch.reserve(BATCH);
        }
    };
    let tree = walk(&mut sink);
    if let Some(e) = failed {
        return Err(e);
    }
    if !batch.is_empty() {
        let _ = tx.send(batch);
    }
    cursor.finish(&mut |p, rec| stale.push((p, rec)))?;
    Ok((tree, stale))
}

/// A replica root that does not exist: nothing seen, every record stale.
fn missing_side(mut cursor: Cursor) -> Result<(Tree, Vec<(RelPath, Entry)>)> {
    let mut stale = Vec::new();
    cursor.finish(&mut |p, rec| stale.push((p, rec)))?;
    Ok((Tree::default(), stale))
}

/// Counts the entries both walks sent, and says so now and then.
struct Progress<'s> {
    sink: &'s mut dyn Sink,
    /// Source, replica.
    seen: [u64; 2],
    last: Instant,
}

impl<'s> Progress<'s> {
    fn new(sink: &'s mut dyn Sink) -> Self {
        Progress {
            sink,
            seen: [0; 2],
            last: Instant::now(),
        }
    }

    /// One batch of `n` entries of `side` (0: source, 1: replica) arrived.
    fn saw(&mut self, side: usize, n: usize) {
        self.seen[side] += n as u64;
        if self.last.elapsed() >= PROGRESS_INTERVAL {
            self.last = Instant::now();
            let [source, replica] = self.seen;
            self.sink.event(&Event::Scanned { source, replica });
        }
    }
}

/// The entries of one walk as they arrive.
struct Stream<'p, 's> {
    rx: Receiver<Batch>,
    current: std::vec::IntoIter<(RelPath, Entry)>,
    side: usize,
    progress: &'p RefCell<Progress<'s>>,
}

impl<'p, 's> Stream<'p, 's> {
    fn new(rx: Receiver<Batch>, side: usize, progress: &'p RefCell<Progress<'s>>) -> Self {
        Stream {
            rx,
            current: Vec::new().into_iter(),
            side,
            progress,
        }
    }
}

impl Iterator for Stream<'_, '_> {
    type Item = (RelPath, Entry);

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(item) = self.current.next() {
                return Some(item);
            }
            let batch = self.rx.recv().ok()?;
            self.progress.borrow_mut().saw(self.side, batch.len());
            self.current = batch.into_iter();
        }
    }
}

/// A directory whose subtree the join has not left yet.
struct Open {
    path: RelPath,
    src: Option<Entry>,
    dst: Option<Entry>,
    kept: bool,
}

/// True if `path` sorts inside the subtree of directory `dir` (between `dir/` and `dir0`).
/// Paths that sort between `dir` and `dir/` (such as `dir-x`) keep `dir` open.
fn still_open(dir: &RelPath, path: &RelPath) -> bool {
    let (d, p) = (dir.as_bytes(), path.as_bytes());
    dir.is_root() || (p.len() > d.len() && p.starts_with(d) && p[d.len()] < b'0')
}

/// True when the two sides are known to be the same node: nothing to do and nothing to learn.
pub fn settled(src: &Entry, dst: &Entry, owners: bool) -> bool {
    let content = match (&src.content, &dst.content) {
        (Content::Dir { .. }, Content::Dir { .. }) => true,
        _ => src.same_content(dst) && src.link == dst.link,
    };
    content && src.same_meta(dst, owners)
}

/// Joins the two walks and keeps what may differ (see the module documentation).
fn join(
    src: impl Iterator<Item = (RelPath, Entry)>,
    dst: impl Iterator<Item = (RelPath, Entry)>,
    owners: bool,
) -> Merged {
    let mut m = Merged::default();
    // Kept paths go straight into the two trees, sorted at the end (see below).
    let keep_in = |m: &mut Merged, path: RelPath, s: Option<Entry>, d: Option<Entry>| match (s, d) {
        (Some(a), Some(b)) => {
            m.src.tree.entries.push((path.clone(), a));
            m.dst.tree.entries.push((path, b));
        }
        (Some(a), None) => m.src.tree.entries.push((path, a)),
        (None, Some(b)) => m.dst.tree.entries.push((path, b)),
        (None, None) => {}
    };
    // Directories whose subtrees are still ahead; each opened inside the one below it, so they
    // close in reverse order.
    let mut open: Vec<Open> = Vec::new();
    let (mut src, mut dst) = (src.peekable(), dst.peekable());
    loop {
        let order = match (src.peek(), dst.peek()) {
            (None, None) => break,
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (Some((a, _)), Some((b, _))) => a.cmp(b),
        };
        let (path, s, d) = match order {
            std::cmp::Ordering::Less => {
                let (p, e) = src.next().expect("peeked");
                (p, Some(e), None)
            }
            std::cmp::Ordering::Greater => {
                let (p, e) = dst.next().expect("peeked");
                (p, None, Some(e))
            }
            std::cmp::Ordering::Equal => {
                let (p, a) = src.next().expect("peeked");
                let (_, b) = dst.next().expect("peeked");
                (p, Some(a), Some(b))
            }
        };
        m.src.count(s.as_ref());
        m.dst.count(d.as_ref());
        while open.last().is_some_and(|o| !still_open(&o.path, &path)) {
            open.pop();
        }
        let keep = match (&s, &d) {
            (Some(a), Some(b)) => !settled(a, b, owners),
            _ => true,
        } || path.is_root()
            // Names the planner must not pick for its staging area.
            || (path.depth() == 1 && path.name().starts_with(TMP_PREFIX.as_bytes()));
        if keep {
            for o in open
                .iter_mut()
                .filter(|o| !o.kept && o.path.is_ancestor_of(&path))
            {
                o.kept = true;
                keep_in(&mut m, o.path.clone(), o.src.clone(), o.dst.clone());
            }
        }
        if let Some(e) = &d {
            m.contents.add(&path, e, !keep);
        }
        let is_dir = |e: &Option<Entry>| e.as_ref().is_some_and(Entry::is_dir);
        if is_dir(&s) || is_dir(&d) {
            open.push(Open {
                path: path.clone(),
                src: s.clone(),
                dst: d.clone(),
                kept: keep,
            });
        }
        if keep {
            keep_in(&mut m, path, s, d);
        }
    }
    // A parent is kept when its first kept child is met, after paths that sort between them.
    // The trees are nearly sorted and hold each path once: sorted in place.
    m.src.tree.entries.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    m.dst.tree.entries.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    m.contents.prefixes.sort_unstable();
    m.contents.prefixes.dedup();
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diff::tests::{dir, file, link, p, tree};

    fn paths(t: &[(RelPath, Entry)]) -> Vec<String> {
        t.iter().map(|(p, _)| p.to_string()).collect()
    }

    fn run(src: &[(RelPath, Entry)], dst: &[(RelPath, Entry)]) -> Merged {
        join(src.iter().cloned(), dst.iter().cloned(), false)
    }

    #[test]
    fn an_unchanged_tree_keeps_only_the_root() {
        let t = tree(vec![
            ("a", dir()),
            ("a/x", file("x", 1)),
            ("a-b", dir()),
            ("a-b/y", file("y", 1)),
            ("l", link("a")),
        ]);
        let m = run(&t, &t);
        assert_eq!(paths(&m.src.tree.entries), ["."]);
        assert_eq!(paths(&m.dst.tree.entries), ["."]);
        assert_eq!((m.src.seen, m.dst.seen), (6, 6));
    }

    #[test]
    fn a_change_keeps_its_parent_even_across_paths_that_sort_between() {
        let src = tree(vec![
            ("a", dir()),
            ("a-b", dir()),
            ("a-b/y", file("y", 1)),
            ("a.c", file("c", 1)),
            ("a/x", file("new", 2)),
            ("b", dir()),
        ]);
        let mut dst = src.clone();
        dst[5].1 = file("old", 1); // a/x
        let m = run(&src, &dst);
        assert_eq!(paths(&m.src.tree.entries), [".", "a", "a/x"]);
        assert_eq!(paths(&m.dst.tree.entries), [".", "a", "a/x"]);
    }

    #[test]
    fn a_change_keeps_every_ancestor() {
        let src = tree(vec![
            ("d", dir()),
            ("d/e", dir()),
            ("d/e/b", file("new", 2)),
            ("z", dir()),
        ]);
        let mut dst = src.clone();
        dst[3].1 = file("old", 1);
        let m = run(&src, &dst);
        assert_eq!(paths(&m.src.tree.entries), [".", "d", "d/e", "d/e/b"]);
        assert_eq!(paths(&m.dst.tree.entries), [".", "d", "d/e", "d/e/b"]);
    }

    #[test]
    fn an_added_directory_is_kept_whole_and_a_deleted_one_too() {
        let src = tree(vec![("n", dir()), ("n/d", dir()), ("n/d/f", file("f", 1))]);
        let dst = tree(vec![("o", dir()), ("o/f", file("f", 1))]);
        let m = run(&src, &dst);
        assert_eq!(paths(&m.src.tree.entries), [".", "n", "n/d", "n/d/f"]);
        assert_eq!(paths(&m.dst.tree.entries), [".", "o", "o/f"]);
    }

    #[test]
    fn unknown_hashes_are_kept_and_known_equal_ones_are_not() {
        let src = tree(vec![("a", file("a", 1)), ("b", file("b", 1))]);
        let mut dst = src.clone();
        if let Content::File { hash, .. } = &mut dst[2].1.content {
            *hash = None;
        }
        let m = run(&src, &dst);
        assert_eq!(paths(&m.dst.tree.entries), [".", "b"]);
        let (a, b) = (src[1].1.file_hash().unwrap(), src[2].1.file_hash().unwrap());
        assert_eq!(m.contents.lookup(&a, 1), Lookup::Unknown);
        assert_eq!(m.contents.lookup(&b, 1), Lookup::Absent);
    }

    #[test]
    fn large_dropped_replica_files_are_found_by_content() {
        let big = |h: u8| Entry {
            content: Content::File {
                size: LARGE,
                hash: Some([h; 32]),
            },
            ..file("", 1)
        };
        let src = tree(vec![("big", big(1)), ("gone", big(3))]);
        let mut dst = tree(vec![("big", big(1)), ("old", big(2)), ("gone", big(3))]);
        dst[1].1.meta.mode = 0o600; // "big": kept (metadata differ)
        let m = run(&src, &dst);
        assert_eq!(m.contents.lookup(&[1; 32], LARGE), Lookup::Absent, "kept");
        assert_eq!(m.contents.lookup(&[2; 32], LARGE), Lookup::Absent, "kept");
        let Lookup::Found((p, _)) = m.contents.lookup(&[3; 32], LARGE) else {
            panic!("unchanged large file not found");
        };
        assert_eq!(p.to_string(), "gone");
        assert_eq!(m.contents.lookup(&[4; 32], LARGE), Lookup::Absent);
    }

    #[test]
    fn sizes_small_and_large() {
        let mut s = Sizes::default();
        assert!(!s.contains(0));
        for n in [0, 63, 64, SMALL - 1, SMALL, 5 << 30] {
            s.insert(n);
            assert!(s.contains(n), "{n}");
        }
        for n in [1, 62, 65, SMALL - 2, SMALL + 1] {
            assert!(!s.contains(n), "{n}");
        }
    }

    #[test]
    fn staging_names_at_the_root_are_kept() {
        let t = tree(vec![(".dirsync-tmp-stage-0", file("x", 1))]);
        let m = run(&t, &t);
        assert_eq!(paths(&m.src.tree.entries), [".", ".dirsync-tmp-stage-0"]);
    }

    #[test]
    fn only_directories_keep_a_subtree_open() {
        let d = RelPath::root().join(b"a");
        assert!(still_open(&d, &p("a/x")));
        assert!(!still_open(&d, &p("a0")));
        assert!(still_open(&d, &p("a-b")), "sorts between a and a/");
        assert!(!still_open(&d, &p("b/x")));
        assert!(still_open(&RelPath::root(), &p("z")));
    }
}
