//! Runs a [`Plan`] against a [`Replica`], recording every finished operation in the index and
//! telling a [`Sink`] what each operation did.
//!
//! Invariants:
//! - A failed operation is reported with its path and counted; the rest of the plan still runs,
//!   and the index keeps its old row for that path, so the next sync retries it.
//! - A file is recorded with the hash of the bytes that were actually written. A source file that
//!   changes while it is copied is not put in place at all.
//! - A copy inside the replica is put in place only if its own bytes hash to the source's
//!   content. A copy source that fails this no longer holds what it was recorded with (bit rot
//!   under an unchanged stat): the target is written from the source, and the original is
//!   rewritten from the source ([`restore_from_source`]) or, if the source no longer has that
//!   content, forgotten by the index so that the next sync replaces it. Either way an error is
//!   logged; only the second is counted, since after the first the replica is right.
//! - Source files are read for copying in one way only, [`Source::open`]: beneath the source
//!   root, through no symlink in any component, only the node the scan saw at that path, and
//!   between two `fstat`s that agree ([`crate::scan::StableRead`]). Nothing outside the source is ever read;
//!   a path that changed since the scan is reported and retried on the next pass.
//! - Records are committed in batches (one durable redb commit per [`BATCH_OPS`] operations or
//!   [`BATCH_TIME`]); a killed sync loses at most one batch of records, never replica state: the
//!   next scan finds those files in the replica and re-hashes them instead of copying them.
//! - The stop flag is checked between operations: an interrupted sync commits what it did.

use std::collections::HashSet;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rayon::prelude::*;

use crate::entry::{Content, Entry, Hash, Kind, RACY_WINDOW_NS, RelPath, Stamp, Time};
use crate::error::{ErrorKind, PathError, Result};
use crate::event::{Event, Sink};
use crate::index::{Index, Table, Update};
use crate::plan::{Code, Op, Plan};
use crate::replica::Replica;
use crate::source::{Source, is_changed, is_vanished};

pub const BATCH_OPS: usize = 4096;
pub const BATCH_TIME: Duration = Duration::from_secs(2);

/// What applying a plan did.
#[derive(Debug, Default)]
pub struct Outcome {
    pub ops_done: u64,
    /// The plan's changes that were carried out, by status code (an operation that failed or was
    /// never reached is not counted).
    pub done: Tally,
    pub bytes_written: u64,
    /// Operations that failed, each with its replica path.
    pub errors: Vec<PathError>,
    pub interrupted: bool,
    /// The replica's filesystem ran out of space (or quota); the run stopped there.
    pub disk_full: bool,
    /// The replica's filesystem is read-only; the run stopped at the first write it refused.
    pub read_only: bool,
    /// The index's filesystem ran out of space; the run stopped there.
    pub index_full: bool,
}

/// Counts of applied changes, one per status [`Code`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tally([u64; 7]);

impl Tally {
    pub fn get(&self, code: Code) -> u64 {
        self.0[code as usize]
    }

    pub fn add(&mut self, code: Code) {
        self.0[code as usize] += 1;
    }

    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }
}

/// Which change of the plan an applied operation completes. Most operations carry their code;
/// a removal is a change only when the path leaves the replica (`D`, not the first half of a
/// `T`), and a metadata update only when it is the plan's `m` item for that path (not the
/// restoring of a directory's mtime after its entries changed).
struct Changes<'a> {
    deletes: HashSet<&'a RelPath>,
    metas: HashSet<&'a RelPath>,
}

impl<'a> Changes<'a> {
    fn of(plan: &'a Plan) -> Self {
        let of_code = |c: Code| -> HashSet<&'a RelPath> {
            plan.items
                .iter()
                .filter(|i| i.code == c)
                .map(|i| &i.path)
                .collect()
        };
        Changes {
            deletes: of_code(Code::Delete),
            metas: of_code(Code::Meta),
        }
    }

    fn code(&self, op: &Op) -> Option<Code> {
        match op {
            Op::Stage { .. } => None,
            Op::Remove { path, .. } => self.deletes.contains(path).then_some(Code::Delete),
            Op::SetMeta { path, .. } => self.metas.contains(path).then_some(Code::Meta),
            Op::Rename { .. } => Some(Code::Move),
            Op::Copy { .. } => Some(Code::Copy),
            Op::Mkdir { code, .. }
            | Op::Write { code, .. }
            | Op::Symlink { code, .. }
            | Op::Link { code, .. } => Some(*code),
        }
    }
}

/// Batches index updates and commits them durably from time to time. A failed commit (a full
/// disk under the index) is kept in `failed`; the apply loop stops when it sees one.
pub struct Recorder<'a> {
    index: Option<&'a Index>,
    pending: Vec<Update>,
    last: Instant,
    pub failed: Option<crate::error::Error>,
}

impl<'a> Recorder<'a> {
    pub fn new(index: Option<&'a Index>) -> Self {
        Recorder {
            index,
            pending: Vec::new(),
            last: Instant::now(),
            failed: None,
        }
    }

    pub fn push(&mut self, u: Update) {
        if self.failed.is_some() {
            return;
        }
        self.pending.push(u);
        if self.pending.len() >= BATCH_OPS || self.last.elapsed() >= BATCH_TIME {
            self.flush();
        }
    }

    pub fn flush(&mut self) {
        if let (Some(index), None) = (self.index, &self.failed)
            && let Err(e) = index.commit(&self.pending)
        {
            self.failed = Some(e);
        }
        self.pending.clear();
        self.last = Instant::now();
    }
}

/// A replica entry for a node dirsync has just written and then stat'ed: its content is known by
/// construction, not from a read that could race a writer. With a POSIX stamp that makes it
/// not racily clean: any later change moves the ctime past what was stat'ed. A seconds stamp
/// has no ctime, and a change by someone else within the same second as the mtime dirsync set
/// leaves it as it was: such an entry is as racy as the time it was stat'ed says (now).
pub fn written(src: &Entry, content: Content, fp: Stamp) -> Entry {
    let seen = match fp {
        Stamp::Seconds { .. } => Time::now(),
        // An object stamp has no time and is never racy: any `seen` will do.
        Stamp::Posix { .. } | Stamp::Object { .. } => {
            let changed = fp.changed_ns().unwrap_or(0) + RACY_WINDOW_NS + 1;
            Time {
                sec: (changed / 1_000_000_000) as i64,
                nsec: (changed % 1_000_000_000) as u32,
            }
        }
    };
    Entry {
        content,
        meta: src.meta,
        fp,
        seen,
        link: src.link.clone(),
    }
}

struct Ctx<'a> {
    plan: &'a Plan,
    replica: &'a dyn Replica,
    source: &'a dyn Source,
    /// Staging names whose `Stage` failed: their node never left its place.
    unstaged: std::sync::Mutex<std::collections::HashSet<RelPath>>,
    /// Directories whose `Mkdir` failed: nothing below them is attempted.
    /// Directories that could not be created, with why.
    no_dirs: std::sync::Mutex<Vec<(RelPath, ErrorKind)>>,
    any_no_dir: AtomicBool,
    /// Corrupt copy sources met by the last operation, for the apply loop to record and report.
    repairs: std::sync::Mutex<Vec<Repair>>,
    /// The hard-link leaders of the plan's `Link` operations, each with what writing it in this
    /// pass learned (`None` until it is written): the links record the same content.
    leaders: std::sync::Mutex<std::collections::HashMap<RelPath, Option<Learned>>>,
}

/// What writing a leader learned: its content, and the source node read with the time it was
/// stat'ed.
#[derive(Clone)]
struct Learned {
    content: Content,
    source_fp: Stamp,
    seen: Time,
}

/// The error for an operation below a directory that could not be created, and the kind of
/// that directory's failure.
#[derive(Debug)]
struct NoDir(RelPath, ErrorKind);

impl std::fmt::Display for NoDir {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "its directory {} could not be created (see above)",
            self.0
        )
    }
}

impl std::error::Error for NoDir {}

/// The kind of an operation's error: dirsync's own payloads by what they mean, the rest by
/// [`ErrorKind::of`].
fn kind_of(e: &io::Error) -> ErrorKind {
    match e.get_ref() {
        Some(x) => match x.downcast_ref::<NoDir>() {
            Some(NoDir(_, kind)) => *kind,
            None => ErrorKind::of(e),
        },
        None => ErrorKind::of(e),
    }
}

/// The result of one operation: index updates, bytes copied.
type OpResult = io::Result<(Vec<Update>, u64)>;

impl Ctx<'_> {
    fn run(&self, op: &Op) -> OpResult {
        if self.any_no_dir.load(Ordering::Relaxed) {
            let no_dirs = self.no_dirs.lock().expect("not poisoned");
            if let Some((d, kind)) = no_dirs.iter().find(|(d, _)| d.is_ancestor_of(op.target())) {
                return Err(io::Error::other(NoDir(d.clone(), *kind)));
            }
        }
        let res = self.run_op(op);
        if let (Op::Mkdir { path, .. }, Err(e)) = (op, &res) {
            self.no_dirs
                .lock()
                .expect("not poisoned")
                .push((path.clone(), kind_of(e)));
            self.any_no_dir.store(true, Ordering::Relaxed);
        }
        res
    }

    fn run_op(&self, op: &Op) -> OpResult {
        let r = self.replica;
        match op {
            Op::Stage { from, tmp } => {
                if let Err(e) = r.rename(from, tmp) {
                    self.unstaged
                        .lock()
                        .expect("not poisoned")
                        .insert(tmp.clone());
                    return Err(e);
                }
                Ok((
                    vec![Update::Move(Table::Replica, from.clone(), tmp.clone())],
                    0,
                ))
            }
            Op::Remove { path, kind } => {
                r.remove(path, *kind)?;
                Ok((vec![Update::Remove(Table::Replica, path.clone())], 0))
            }
            Op::Mkdir { path, .. } => {
                r.mkdir(path)?;
                Ok((Vec::new(), 0))
            }
            Op::Rename { tmp, orig, to, src } => {
                let src = self.plan.entry(*src);
                if self.unstaged.lock().expect("not poisoned").contains(tmp) {
                    // The node could not be moved aside; a file can still come from the source.
                    return match src.kind() {
                        Kind::File => self.write(to, src),
                        _ => Err(io::Error::other(format!("{orig} could not be moved aside"))),
                    };
                }
                if let Err(e) = r.rename(tmp, to) {
                    if tmp == orig {
                        // Not staged: the node is still at its old place, which the source no
                        // longer has. A file can still come from the source; the old one goes.
                        if src.kind() != Kind::File {
                            return Err(e);
                        }
                        let wrote = self.write(to, src);
                        let removed = r.remove(orig, Kind::File);
                        let (mut u, n) = wrote?;
                        removed?;
                        u.push(Update::Remove(Table::Replica, orig.clone()));
                        return Ok((u, n));
                    }
                    // A staged node's old place is gone by now. A staged file is dropped (the
                    // source has its bytes); a directory stays staged and the next sync reuses or
                    // removes it.
                    if !src.is_dir() {
                        let _ = r.remove(tmp, Kind::File);
                    }
                    return Err(e);
                }
                let mut u = vec![Update::Move(Table::Replica, tmp.clone(), to.clone())];
                if !src.is_dir() {
                    let fp = r.stat(to)?;
                    u.push(Update::Put(
                        Table::Replica,
                        to.clone(),
                        written(src, src.content.clone(), fp),
                    ));
                }
                Ok((u, 0))
            }
            Op::Copy {
                from,
                to,
                src,
                trusted,
            } => self.copy(from, to, self.plan.entry(*src), trusted.as_deref()),
            Op::Write { path, src, .. } => self.write(path, self.plan.entry(*src)),
            Op::Symlink { path, src, .. } => {
                let src = self.plan.entry(*src);
                let Content::Symlink { target } = &src.content else {
                    unreachable!("planned for symlinks only")
                };
                r.symlink(path, target, &src.meta)?;
                Ok((Vec::new(), 0))
            }
            Op::Link {
                leader, path, src, ..
            } => {
                let fp = r.hard_link(leader, path)?;
                Ok((self.linked(leader, path, self.plan.entry(*src), fp), 0))
            }
            Op::SetMeta { path, src } => {
                let src = self.plan.entry(*src);
                r.set_meta(path, src.kind(), &src.meta)?;
                if src.kind() == Kind::File {
                    let fp = r.stat(path)?;
                    return Ok((
                        vec![Update::Put(
                            Table::Replica,
                            path.clone(),
                            written(src, src.content.clone(), fp),
                        )],
                        0,
                    ));
                }
                Ok((Vec::new(), 0))
            }
        }
    }

    /// Copies the replica file `from` to `to`, which the plan wants with the content of `src`.
    /// A copy whose bytes do not hash to that content is never put in place: `to` is written
    /// from the source instead, and `from`, which no longer holds what it was recorded with, is
    /// repaired or reported ([`Ctx::repair_original`]). `recorded` is `from`'s replica entry
    /// when the plan was made.
    fn copy(
        &self,
        from: &RelPath,
        to: &RelPath,
        src: &Entry,
        recorded: Option<&Entry>,
    ) -> OpResult {
        let want = src.file_hash();
        let mut differs = false;
        let mut check = |h: &Hash, n: u64| {
            if Some(*h) == want && n == src.size() {
                return Ok(());
            }
            differs = true;
            Err(io::Error::other(format!(
                "replica file {from} does not hold the content it was recorded with"
            )))
        };
        match self.replica.copy_file(from, to, &src.meta, &mut check) {
            Ok(w) => {
                let content = Content::File {
                    size: w.len,
                    hash: Some(w.hash),
                };
                let u = Update::Put(Table::Replica, to.clone(), written(src, content, w.fp));
                Ok((vec![u], 0))
            }
            Err(_) => {
                if differs && let Some(repair) = self.repair_original(from, recorded) {
                    self.repairs.lock().expect("not poisoned").push(repair);
                }
                // The local copy went bad: take the bytes from the source tree instead.
                self.write(to, src)
            }
        }
    }

    /// `from` was to be copied but its bytes do not hash to the content it was chosen for.
    /// With the stat it was recorded with, it rotted (or was edited behind the filesystem's
    /// back): it is rewritten from the source if the source still has that content; otherwise
    /// its record is forgotten, so that the next sync hashes it again and replaces it. A file
    /// that visibly changed since the scan needs nothing: its new stat makes the next sync
    /// hash it again. A file that this plan moved into place has no earlier record to go by
    /// and is forgotten.
    fn repair_original(&self, from: &RelPath, recorded: Option<&Entry>) -> Option<Repair> {
        let forget = vec![Update::Forget(Table::Replica, from.clone())];
        let Some(recorded) = recorded else {
            return Some(Repair {
                path: from.clone(),
                updates: forget,
                msg: format!(
                    "replica file {from} does not hold the content it was moved in with; the \
                     next sync replaces it"
                ),
                fixed: false,
            });
        };
        if self.replica.stat(from).ok()? != recorded.fp {
            return None;
        }
        let what =
            format!("replica file {from} is corrupt (its bytes no longer match what was written)");
        let (updates, msg, fixed) =
            match restore_from_source(self.replica, self.source, from, recorded) {
                Ok(Some(e)) => (
                    vec![Update::Put(Table::Replica, from.clone(), e)],
                    format!("{what}; it is rewritten from the source"),
                    true,
                ),
                Ok(None) => (
                    forget,
                    format!(
                        "{what}; the source no longer has that content, so the next sync \
                         replaces it"
                    ),
                    false,
                ),
                Err(e) => (
                    forget,
                    format!(
                        "{what}; it could not be rewritten from the source ({e}); the next \
                         sync replaces it"
                    ),
                    false,
                ),
            };
        Some(Repair {
            path: from.clone(),
            updates,
            msg,
            fixed,
        })
    }

    /// The records of a hard link just made at `path` to `leader`, whose shared inode now has
    /// the stamp `fp`. The content is the planned one, or what writing the leader in this pass
    /// learned. Linking changed the inode's ctime, so the leader's record is renewed too, and
    /// the source's link is recorded as read when the leader was, if it is that same node.
    fn linked(&self, leader: &RelPath, path: &RelPath, src: &Entry, fp: Stamp) -> Vec<Update> {
        let learned = self
            .leaders
            .lock()
            .expect("not poisoned")
            .get(leader)
            .cloned();
        let learned = learned.flatten();
        let content = match (&learned, src.file_hash()) {
            (Some(l), None) => l.content.clone(),
            _ => src.content.clone(),
        };
        let link = written(src, content.clone(), fp);
        let mut updates = vec![Update::Put(Table::Replica, path.clone(), link.clone())];
        if src.file_hash().is_some() || learned.is_some() {
            let lead = Entry { link: None, ..link };
            updates.push(Update::Put(Table::Replica, leader.clone(), lead));
        }
        if let Some(l) = learned
            && src.file_hash().is_none()
            && l.source_fp == src.fp
        {
            let source = Entry {
                content,
                seen: l.seen,
                ..src.clone()
            };
            updates.push(Update::Put(Table::Source, path.clone(), source));
        }
        updates
    }

    /// Copies a file from the source, hashing it on the way, and records both sides.
    fn write(&self, path: &RelPath, planned: &Entry) -> OpResult {
        let file = self.source.open(path, planned.fp.node())?;
        // Metadata as the file is now: it may have changed since the scan.
        let mut src = planned.clone();
        src.meta = file.meta();
        let mut check = |_: &Hash, n: u64| file.check_unchanged(n);
        let w = self
            .replica
            .write_file(path, &mut file.reader(), &src.meta, &mut check)?;
        let (h, n, rfp) = (w.hash, w.len, w.fp);
        let content = Content::File {
            size: n,
            hash: Some(h),
        };
        let mut updates = vec![Update::Put(
            Table::Replica,
            path.clone(),
            written(&src, content.clone(), rfp),
        )];
        src.content = content;
        src.fp = file.fingerprint();
        src.seen = file.seen();
        if let Some(l) = self.leaders.lock().expect("not poisoned").get_mut(path) {
            *l = Some(Learned {
                content: src.content.clone(),
                source_fp: src.fp,
                seen: src.seen,
            });
        }
        updates.push(Update::Put(Table::Source, path.clone(), src));
        Ok((updates, n))
    }
}

/// A corrupt copy source met while applying, and what was done about it.
struct Repair {
    path: RelPath,
    updates: Vec<Update>,
    msg: String,
    /// Rewritten from the source; otherwise it is left for the next sync, and counted as an
    /// error.
    fixed: bool,
}

/// Whether an error opening a source file means that the path no longer holds the regular file
/// it held.
fn gone_from_source(e: &io::Error) -> bool {
    is_vanished(e) || is_changed(e)
}

/// Whether the source's file at `path` holds the content `recorded` says, read as
/// [`restore_from_source`] would read it. Writes nothing.
pub fn source_has(source: &dyn Source, path: &RelPath, recorded: &Entry) -> io::Result<bool> {
    let Some(want) = recorded.file_hash() else {
        return Ok(false);
    };
    let file = match source.open(path, None) {
        Ok(f) => f,
        Err(e) if gone_from_source(&e) => return Ok(false),
        Err(e) => return Err(e),
    };
    if file.len() != recorded.size() {
        return Ok(false);
    }
    let (h, n) = crate::hash::hash_reader(&mut file.reader(), file.len())?;
    file.check_unchanged(n)?;
    Ok(h == want)
}

/// Rewrites the replica file `path` from the source, with the metadata of `recorded` (its
/// replica entry), provided the source's file at `path` still holds the content `recorded`
/// says. Returns the file's new replica entry, or `None` when the source no longer has that
/// content (changed or gone); then nothing was written.
pub fn restore_from_source(
    replica: &dyn Replica,
    source: &dyn Source,
    path: &RelPath,
    recorded: &Entry,
) -> io::Result<Option<Entry>> {
    let Some(want) = recorded.file_hash() else {
        return Ok(None);
    };
    let file = match source.open(path, None) {
        Ok(f) => f,
        Err(e) if gone_from_source(&e) => return Ok(None),
        Err(e) => return Err(e),
    };
    if file.len() != recorded.size() {
        return Ok(None);
    }
    let mut differs = false;
    let mut check = |h: &Hash, n: u64| {
        file.check_unchanged(n)?;
        if *h != want {
            differs = true;
            return Err(io::Error::other("the source has other content"));
        }
        Ok(())
    };
    match replica.write_file(path, &mut file.reader(), &recorded.meta, &mut check) {
        Ok(w) => {
            let content = Content::File {
                size: w.len,
                hash: Some(w.hash),
            };
            Ok(Some(written(recorded, content, w.fp)))
        }
        Err(_) if differs => Ok(None),
        Err(e) => Err(e),
    }
}

/// A chunk of a write run ends after this many files...
const CHUNK_OPS: usize = 32;
/// ...or once it holds this many bytes, so that large files are spread over the pool.
const CHUNK_BYTES: u64 = 1 << 20;

/// Splits a run of writes into chunks of neighbouring files, as boundaries (`0`, ..., `len`).
/// A worker copies a chunk in order and sends its results at once: one wake-up of the recorder
/// per chunk instead of per file, and each worker stays in its own directories.
fn chunks(plan: &Plan, run: &[Op]) -> Vec<usize> {
    let mut bounds = vec![0];
    let (mut ops, mut bytes) = (0, 0u64);
    for (k, op) in run.iter().enumerate() {
        if let Op::Write { src, .. } = op {
            bytes += plan.entry(*src).size();
        }
        ops += 1;
        if ops == CHUNK_OPS || bytes >= CHUNK_BYTES {
            bounds.push(k + 1);
            (ops, bytes) = (0, 0);
        }
    }
    if ops > 0 {
        bounds.push(run.len());
    }
    bounds
}

/// Test hook: `DIRSYNC_FAULT_KILL_AFTER=N` kills the process with SIGKILL right after the N-th
/// applied operation, before its record is committed, as a crash or `kill -9` would. Built
/// only with the `fault-hooks` feature, which every test build has and no other build
/// (docs/ARCHITECTURE.md, "Fault hooks").
#[cfg(feature = "fault-hooks")]
fn fault_kill_after() -> Option<u64> {
    std::env::var("DIRSYNC_FAULT_KILL_AFTER").ok()?.parse().ok()
}

#[cfg(not(feature = "fault-hooks"))]
fn fault_kill_after() -> Option<u64> {
    None
}

/// Applies `plan` to `replica`, reading new content from `source`. Each operation run is an
/// [`Event::Applied`] or [`Event::Failed`] to `log`.
pub fn apply(
    plan: &Plan,
    replica: &dyn Replica,
    source: &dyn Source,
    rec: &mut Recorder,
    log: &mut dyn Sink,
    stop: &AtomicBool,
) -> Result<Outcome> {
    let ctx = Ctx {
        plan,
        replica,
        source,
        unstaged: Default::default(),
        no_dirs: Default::default(),
        any_no_dir: AtomicBool::new(false),
        repairs: Default::default(),
        leaders: std::sync::Mutex::new(
            plan.ops
                .iter()
                .filter_map(|op| match op {
                    Op::Link { leader, .. } => Some((leader.clone(), None)),
                    _ => None,
                })
                .collect(),
        ),
    };
    let kill_after = fault_kill_after();
    let changes = Changes::of(plan);
    let mut out = Outcome::default();
    let ops = &plan.ops;
    let mut i = 0;
    while i < ops.len() {
        if stop.load(Ordering::Relaxed) {
            out.interrupted = true;
            break;
        }
        if !matches!(ops[i], Op::Write { .. }) {
            let res = ctx.run(&ops[i]);
            out.finish(&ops[i], res, (rec, log), &changes, kill_after)?;
            out.repaired(&ctx, rec, log);
            i += 1;
            if out.halted() || rec.failed.is_some() {
                break;
            }
            continue;
        }
        // A run of writes from the source: copied on the rayon pool, in chunks of neighbouring
        // files (see [`chunks`]), while this thread records and logs each result as its chunk
        // arrives.
        let n = ops[i..]
            .iter()
            .take_while(|o| matches!(o, Op::Write { .. }))
            .count();
        let run = &ops[i..i + n];
        let bounds = chunks(plan, run);
        let halt = AtomicBool::new(false);
        let (tx, rx) = std::sync::mpsc::channel::<Vec<(usize, OpResult)>>();
        let recorded: Result<()> = std::thread::scope(|s| {
            let (ctx, halt) = (&ctx, &halt);
            let bounds = &bounds;
            s.spawn(move || {
                bounds
                    .par_windows(2)
                    .with_max_len(1)
                    .for_each_with(tx, |tx, w| {
                        let mut done = Vec::with_capacity(w[1] - w[0]);
                        ctx.replica.batch(&mut || {
                            for (k, op) in run.iter().enumerate().take(w[1]).skip(w[0]) {
                                if halt.load(Ordering::Relaxed) || stop.load(Ordering::Relaxed) {
                                    break;
                                }
                                done.push((k, ctx.run(op)));
                            }
                        });
                        if !done.is_empty() {
                            let _ = tx.send(done);
                        }
                    });
            });
            for (k, res) in rx.into_iter().flatten() {
                if let Err(e) = out.finish(&run[k], res, (rec, log), &changes, kill_after) {
                    halt.store(true, Ordering::Relaxed);
                    return Err(e);
                }
                // Every later write would fail the same way.
                if out.halted() || rec.failed.is_some() {
                    halt.store(true, Ordering::Relaxed);
                }
            }
            Ok(())
        });
        recorded?;
        i += n;
        if stop.load(Ordering::Relaxed) {
            out.interrupted = true;
        }
        if out.halted() || out.interrupted || rec.failed.is_some() {
            break;
        }
    }
    rec.flush();
    if let Some(e) = rec.failed.take() {
        out.index_full |= matches!(e, crate::error::Error::IndexFull { .. });
        let err = PathError::new(RelPath::root(), e.kind(), e.to_string());
        log.event(&Event::Failed(&err));
        out.errors.push(err);
    }
    Ok(out)
}

impl Outcome {
    /// Records and reports the corrupt copy sources the last operation met. One that was
    /// rewritten from the source is reported but not counted: the replica is right again.
    fn repaired(&mut self, ctx: &Ctx, rec: &mut Recorder, log: &mut dyn Sink) {
        for r in std::mem::take(&mut *ctx.repairs.lock().expect("not poisoned")) {
            for u in r.updates {
                rec.push(u);
            }
            let err = PathError::new(r.path, ErrorKind::Other, r.msg);
            if r.fixed {
                log.event(&Event::Fixed(&err));
            } else {
                log.event(&Event::Failed(&err));
                self.errors.push(err);
            }
        }
    }

    /// Accounts for one finished operation: records and logs it, or reports its error.
    fn finish(
        &mut self,
        op: &Op,
        res: OpResult,
        (rec, log): (&mut Recorder, &mut dyn Sink),
        changes: &Changes,
        kill_after: Option<u64>,
    ) -> Result<()> {
        match res {
            Ok((updates, bytes)) => {
                self.ops_done += 1;
                if let Some(code) = changes.code(op) {
                    self.done.add(code);
                }
                if kill_after == Some(self.ops_done) {
                    let _ = rustix::process::kill_process(
                        rustix::process::getpid(),
                        rustix::process::Signal::KILL,
                    );
                }
                self.bytes_written += bytes;
                log.event(&Event::Applied { op, bytes });
                for u in updates {
                    rec.push(u);
                }
            }
            Err(e) => {
                let path = op.target().clone();
                let halt = halting(&e);
                let msg = match halt {
                    Some(Halt::Full) => format!(
                        "the replica's filesystem is full (writing {path}); stopped here: \
                         free space in the replica and run again, what was done is kept"
                    ),
                    Some(Halt::ReadOnly) => format!(
                        "the replica's filesystem is read-only (writing {path}); stopped here: \
                         remount it read-write and run again, what was done is kept"
                    ),
                    None => describe(op, &e),
                };
                // One message for a full or read-only disk, however many writes were under way.
                if !(halt.is_some() && self.halted()) {
                    let err = PathError::new(path, kind_of(&e), msg);
                    log.event(&Event::Failed(&err));
                    self.errors.push(err);
                }
                self.disk_full |= halt == Some(Halt::Full);
                self.read_only |= halt == Some(Halt::ReadOnly);
            }
        }
        Ok(())
    }

    /// True when every later write would fail the same way as one that did.
    pub fn halted(&self) -> bool {
        self.disk_full || self.read_only
    }
}

/// Replica errors after which the run stops instead of failing every later operation alike.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Halt {
    Full,
    ReadOnly,
}

fn halting(e: &io::Error) -> Option<Halt> {
    use rustix::io::Errno;
    match e.raw_os_error() {
        Some(c) if c == Errno::NOSPC.raw_os_error() || c == Errno::DQUOT.raw_os_error() => {
            Some(Halt::Full)
        }
        Some(c) if c == Errno::ROFS.raw_os_error() => Some(Halt::ReadOnly),
        _ => None,
    }
}

fn describe(op: &Op, e: &io::Error) -> String {
    let what = match op {
        Op::Stage { from, .. } => format!("cannot move {from} aside"),
        Op::Remove { path, .. } => format!("cannot remove {path} from the replica"),
        Op::Mkdir { path, .. } => format!("cannot create directory {path} in the replica"),
        Op::Rename { orig, to, .. } => format!("cannot move {orig} to {to} in the replica"),
        _ if e.get_ref().is_some_and(|x| x.is::<NoDir>()) => {
            format!("cannot create {} in the replica", op.target())
        }
        Op::Copy { to, .. } | Op::Write { path: to, .. } if is_vanished(e) => {
            format!("{to} vanished from the source while syncing")
        }
        Op::Copy { to, .. } | Op::Write { path: to, .. } if is_changed(e) => {
            format!("{to} changed in the source since it was scanned")
        }
        Op::Copy { from, to, .. } => format!("cannot copy {from} to {to}"),
        Op::Write { path, .. } => format!("cannot copy {path}"),
        Op::Symlink { path, .. } => format!("cannot create symlink {path}"),
        Op::Link { leader, path, .. } => format!("cannot hard-link {path} to {leader}"),
        Op::SetMeta { path, .. } => format!("cannot set metadata of {path}"),
    };
    format!("{what}: {e}; it is left as it was and retried on the next sync")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diff::diff;
    use crate::hash::fill_tree_hashes;
    use crate::index::Roots;
    use crate::plan::plan;
    use crate::replica::Capabilities;
    use crate::replica::memory::MemoryReplica;
    use crate::scan::{self, Root, Side};
    use crate::source::{Changed, ChangedWhileCopied, Vanished};
    use crate::source::{LocalFile, LocalSource, SourceFile};
    use std::os::fd::AsFd;
    use std::path::Path;

    fn p(s: &str) -> RelPath {
        RelPath::from_bytes(s.as_bytes()).unwrap()
    }

    /// The plan of a sync of `src` into `mem`.
    fn plan_for(src: &Path, mem: &MemoryReplica) -> Plan {
        let mut tree = scan::walk(src, Side::Source);
        let all: Vec<usize> = tree.unhashed().collect();
        scan::hash_files(src, &mut tree, &all);
        let mut dst = mem.tree();
        fill_tree_hashes(&mut tree.entries, false);
        fill_tree_hashes(&mut dst, false);
        let changes = diff(&tree.entries, &dst, false, &|_| false);
        plan(&changes, &tree.entries, &dst, &Capabilities::posix(false))
    }

    fn run(plan: &Plan, mem: &MemoryReplica, src: &Path, index: Option<&Index>) -> Outcome {
        let stop = AtomicBool::new(false);
        let mut rec = Recorder::new(index);
        let fd = scan::open_dir(src).unwrap();
        let source = LocalSource::new(Root {
            path: src,
            fd: fd.as_fd(),
        });
        apply(
            plan,
            mem,
            &source,
            &mut rec,
            &mut crate::event::Discard,
            &stop,
        )
        .unwrap()
    }

    /// A source with `a`, synced into a memory replica; then `b`, a copy of `a`, is added, and
    /// the next sync planned: it copies `a` inside the replica.
    fn copy_planned(src: &Path, data: &[u8]) -> (MemoryReplica, Plan) {
        std::fs::write(src.join("a"), data).unwrap();
        let mem = MemoryReplica::new(false);
        let first = plan_for(src, &mem);
        assert!(run(&first, &mem, src, None).errors.is_empty());
        std::fs::copy(src.join("a"), src.join("b")).unwrap();
        let plan = plan_for(src, &mem);
        assert!(
            plan.ops
                .iter()
                .any(|op| matches!(op, Op::Copy { from, .. } if *from == p("a"))),
            "{:#?}",
            plan.ops
        );
        (mem, plan)
    }

    /// Opens `rel` beneath `src` as a copy would, expecting the node `scanned`.
    fn open_source(src: &Path, rel: &str, scanned: Option<(u64, u64)>) -> io::Result<LocalFile> {
        let fd = scan::open_dir(src).unwrap();
        LocalFile::open(fd.as_fd(), &p(rel), scanned)
    }

    fn node(path: &Path) -> (u64, u64) {
        use std::os::unix::fs::MetadataExt;
        let md = std::fs::symlink_metadata(path).unwrap();
        (md.dev(), md.ino())
    }

    #[test]
    fn a_source_file_is_never_read_through_a_directory_swapped_for_a_symlink() {
        let tmp = tempfile::tempdir().unwrap();
        let (src, outside) = (tmp.path().join("src"), tmp.path().join("outside"));
        std::fs::create_dir_all(src.join("d")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(src.join("d/f"), b"inside").unwrap();
        std::fs::write(outside.join("f"), b"outside").unwrap();
        let scanned = node(&src.join("d/f"));
        let file = open_source(&src, "d/f", Some(scanned)).unwrap();
        let mut bytes = Vec::new();
        io::Read::read_to_end(&mut file.reader(), &mut bytes).unwrap();
        assert_eq!(bytes, b"inside");
        file.check_unchanged(bytes.len() as u64).unwrap();

        std::fs::rename(src.join("d"), src.join("d.old")).unwrap();
        std::os::unix::fs::symlink(&outside, src.join("d")).unwrap();
        for expect in [Some(scanned), None] {
            let e = open_source(&src, "d/f", expect).expect_err("read through the symlink");
            assert!(is_changed(&e), "{e}");
            assert!(gone_from_source(&e));
            assert_eq!(kind_of(&e), ErrorKind::ChangedWhileRead);
        }
    }

    #[test]
    fn dirsync_payloads_have_their_kinds() {
        let of = |e: io::Error| kind_of(&e);
        assert_eq!(
            of(io::Error::new(io::ErrorKind::NotFound, Vanished)),
            ErrorKind::NotFound
        );
        assert_eq!(of(io::Error::other(Changed)), ErrorKind::ChangedWhileRead);
        assert_eq!(
            of(io::Error::other(ChangedWhileCopied)),
            ErrorKind::ChangedWhileRead
        );
        let denied = ErrorKind::PermissionDenied;
        assert_eq!(of(io::Error::other(NoDir(p("d"), denied))), denied);
        let full = io::Error::from_raw_os_error(rustix::io::Errno::NOSPC.raw_os_error());
        assert_eq!(of(full), ErrorKind::NoSpace);
        assert_eq!(
            of(io::Error::other("copy source is not a regular file")),
            ErrorKind::Other
        );
        assert_eq!(
            ChangedWhileCopied.to_string(),
            "changed while it was being copied"
        );
    }

    #[test]
    fn a_source_file_that_is_another_node_than_the_scan_saw_is_not_copied() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path();
        std::fs::create_dir_all(src.join("a")).unwrap();
        std::fs::create_dir_all(src.join("b")).unwrap();
        std::fs::write(src.join("a/f"), b"a's f").unwrap();
        std::fs::write(src.join("b/f"), b"b's f").unwrap();
        let mem = MemoryReplica::new(false);
        let plan = plan_for(src, &mem);
        // Two directories of the source exchanged after the scan.
        rustix::fs::renameat_with(
            rustix::fs::CWD,
            src.join("a"),
            rustix::fs::CWD,
            src.join("b"),
            rustix::fs::RenameFlags::EXCHANGE,
        )
        .unwrap();
        let out = run(&plan, &mem, src, None);
        let failed: Vec<&str> = out.errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(failed, ["a/f", "b/f"], "{:?}", out.errors);
        for e in &out.errors {
            assert_eq!(e.kind, ErrorKind::ChangedWhileRead, "{e}");
            let (path, msg) = (&e.path, &e.message);
            let want = format!("{path} changed in the source since it was scanned");
            assert!(msg.contains(&want), "{msg}");
            assert!(msg.contains("retried on the next sync"), "{msg}");
        }
        assert_eq!(mem.read(&p("a/f")), None, "b's f was copied to a/f");
        assert_eq!(mem.read(&p("b/f")), None, "a's f was copied to b/f");

        // A file gone since the scan is still "vanished".
        std::fs::remove_file(src.join("a/f")).unwrap();
        let e = open_source(src, "a/f", None).expect_err("gone");
        assert!(is_vanished(&e), "{e}");
        assert_eq!(kind_of(&e), ErrorKind::NotFound);
    }

    #[test]
    fn a_rotten_copy_source_is_not_copied_and_is_rewritten_from_the_source() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
        let (mem, plan) = copy_planned(dir.path(), &data);
        // Bit rot after the plan trusted the record of `a`.
        mem.rot(&p("a"));
        let out = run(&plan, &mem, dir.path(), None);
        assert!(out.errors.is_empty(), "{:?}", out.errors);
        assert_eq!(
            mem.read(&p("b")).unwrap(),
            data,
            "the copy got the rotten bytes"
        );
        assert_eq!(
            mem.read(&p("a")).unwrap(),
            data,
            "the original was not repaired"
        );
    }

    #[test]
    fn a_rotten_copy_source_the_source_no_longer_has_is_reported_and_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir(&src).unwrap();
        let data: Vec<u8> = (0..3000u32).map(|i| (i % 241) as u8).collect();
        let (mem, plan) = copy_planned(&src, &data);
        let replica = dir.path().join("replica");
        let roots = Roots {
            source: &src,
            replica: &replica,
        };
        let index = Index::open(&dir.path().join("index.redb"), &roots, false).unwrap();
        let (_, recorded) = mem.tree().into_iter().find(|(q, _)| *q == p("a")).unwrap();
        index
            .commit(&[Update::Put(Table::Replica, p("a"), recorded)])
            .unwrap();
        mem.rot(&p("a"));
        let rotten = mem.read(&p("a")).unwrap();
        // The source's `a` changes after the scan: it can no longer repair the replica's.
        std::fs::write(src.join("a"), vec![7u8; data.len()]).unwrap();
        let out = run(&plan, &mem, &src, Some(&index));
        assert_eq!(out.errors.len(), 1, "{:?}", out.errors);
        assert_eq!(out.errors[0].path, "a");
        assert!(
            out.errors[0].message.contains("is corrupt"),
            "{}",
            out.errors[0]
        );
        assert_eq!(
            mem.read(&p("b")).unwrap(),
            data,
            "the copy got the rotten bytes"
        );
        assert_eq!(mem.read(&p("a")).unwrap(), rotten, "left for the next sync");
        let records = index.load(Table::Replica).unwrap();
        assert!(
            records.iter().all(|(q, _)| *q != p("a")),
            "the rotten file is still recorded as good"
        );
    }
}
