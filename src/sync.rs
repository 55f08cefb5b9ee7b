//! The commands' engine: scan both trees, diff, plan, and (for `sync`) apply and record.
//!
//! Data flow of one pass:
//! 1. Walk the source and the replica at the same time, one thread each, stat only, and stream
//!    each side's recorded table alongside to reuse hashes whose fingerprint still matches;
//!    keep only the paths that may differ ([`merge`]).
//! 2. Hash the kept files whose hash is not cached and whose size some file on the other side
//!    has (no other file can match them; the rest are hashed while they are copied).
//! 3. Tree hashes of the kept parts, diff, plan; guard rails.
//! 4. Record what the scans learned, apply the plan, record each finished operation.

use std::collections::HashSet;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use crate::apply::{Outcome, Recorder, apply};
use crate::config::Config;
use crate::diff::{Change, diff};
use crate::entry::{Hash, RelPath, shown};
use crate::error::{Error, ErrorKind, PathError, Result};
use crate::event::{Discard, Event, Fanout, Shortfall, Sink, Summary};
use crate::hash::fill_tree_hashes;
use crate::index::{FS_TRAITS, Index, ReadIndex, Roots, Snapshot, Table, Update};
use crate::merge;
use crate::oplog::OpLog;
use crate::plan::{Code, Draft, Plan, plan_with};
use crate::replica::Capabilities;
use crate::replica::local::LocalReplica;
use crate::replica::probe::{self, FsTraits};
use crate::replica::root::ReplicaRoot;
use crate::scan::{self, Root, Tree};

/// What one pass found and did.
#[derive(Debug, Default)]
pub struct Report {
    pub plan: Plan,
    pub outcome: Outcome,
    /// Problems met while scanning (unreadable paths), each with the full path.
    pub scan_errors: Vec<PathError>,
    /// Special files in the source that were skipped.
    pub skipped: Vec<RelPath>,
    pub files_hashed: u64,
    pub bytes_hashed: u64,
    pub elapsed: Duration,
    /// Why a sync would refuse to apply this plan (a guard rail); set by [`status`] only, as
    /// `sync` returns the refusal as its error.
    pub refused: Option<String>,
    /// The pass changed nothing and failed exactly as the session's pass before it did.
    pub repeated: bool,
}

impl Report {
    pub fn error_count(&self) -> usize {
        self.scan_errors.len() + self.outcome.errors.len()
    }

    /// True for a pass that found nothing to do and had nothing to report.
    pub fn is_idle(&self) -> bool {
        self.plan.ops.is_empty()
            && self.plan.items.is_empty()
            && self.error_count() == 0
            && !self.outcome.interrupted
            && !self.outcome.halted()
    }

    /// The pass as counts: what was done, not what was planned; a run that stopped early says
    /// how many planned changes it did not make, and why.
    pub fn totals(&self) -> Summary {
        let (done, o) = (&self.outcome.done, &self.outcome);
        let planned = self.plan.items.len() as u64;
        let not_made = planned.saturating_sub(done.total());
        let shortfall = (not_made > 0).then_some(if o.interrupted {
            Shortfall::Interrupted
        } else if o.disk_full {
            Shortfall::ReplicaFull
        } else if o.read_only {
            Shortfall::ReplicaReadOnly
        } else if o.index_full {
            Shortfall::IndexFull
        } else {
            Shortfall::Errors
        });
        Summary {
            created: done.get(Code::Add),
            modified: done.get(Code::Modify),
            type_changed: done.get(Code::Type),
            deleted: done.get(Code::Delete),
            moved: done.get(Code::Move),
            copied: done.get(Code::Copy),
            metadata: done.get(Code::Meta),
            bytes_written: o.bytes_written,
            errors: self.error_count() as u64,
            planned,
            not_made,
            shortfall,
            interrupted: o.interrupted,
            elapsed: self.elapsed,
        }
    }

    /// The one-line summary printed after a sync and logged ([`Summary::line`]).
    pub fn summary(&self) -> String {
        self.totals().line()
    }
}

pub use crate::event::human_bytes;

/// Both trees of one pass, as far as the plan needs them (see [`merge`]).
struct Scanned {
    src: Tree,
    dst: Tree,
    /// How many paths each walk saw.
    src_seen: usize,
    dst_seen: usize,
    contents: merge::Contents,
    /// Recorded replica paths that the walk did not find as files.
    dst_stale: HashSet<RelPath>,
}

/// What the replica can do and keep: the local replica's declaration (the one backend a path
/// names today).
fn replica_caps(cfg: &Config) -> Capabilities {
    LocalReplica::capabilities_for(cfg.owners)
}

/// Scans both trees beneath their held roots (see [`merge::scan`]; `None`: the replica does not
/// exist yet), then hashes what must be hashed. Returns the kept parts of the trees and what
/// the index should learn from the scan. `probed` is what the replica's filesystem was found
/// to keep; source entries are compared as the replica keeps them ([`Capabilities::keep`]).
/// `sink` hears the scan's progress.
fn scan_both(
    cfg: &Config,
    snapshot: &Snapshot,
    (source, replica): (Root, Option<Root>),
    probed: FsTraits,
    sink: &mut dyn Sink,
) -> Result<(Scanned, Vec<Update>)> {
    let t = Instant::now();
    let caps = replica_caps(cfg);
    let fs = caps.traits(probed);
    let merge::Merged { src, dst, contents } =
        merge::scan(source, replica, snapshot, caps.owners, (fs, caps), sink)?;
    sink.event(&Event::Scanned {
        source: src.seen as u64,
        replica: dst.seen as u64,
    });
    let (mut src_tree, mut dst_tree) = (src.tree, dst.tree);
    let src_moved = scan::reuse_by_inode(&mut src_tree, &src.stale);
    let dst_moved = scan::reuse_by_inode(&mut dst_tree, &dst.stale);
    log::debug!("walked both trees in {:?}", t.elapsed());
    // Every unhashed file is kept by the merge; it needs a hash now only if some file on the
    // other side has its size (otherwise it is hashed while it is copied).
    let need = |t: &Tree, other: &merge::Sizes| -> Vec<usize> {
        t.unhashed()
            .filter(|&i| other.contains(t.entries[i].1.size()))
            .collect()
    };
    let src_need = need(&src_tree, &dst.sizes);
    let dst_need = need(&dst_tree, &src.sizes);
    let src_fresh = scan::hash_files_in(source, &mut src_tree, &src_need);
    // Hashing took the files' metadata afresh (and dropped files that vanished): compare it as
    // the replica keeps it, as the merge did.
    if fs.mtime_grain_ns > 1 || caps != Capabilities::posix(caps.owners) {
        for (_, e) in &mut src_tree.entries {
            caps.keep(e, &fs);
        }
    }
    let dst_fresh = match replica {
        Some(root) => scan::hash_files_in(root, &mut dst_tree, &dst_need),
        None => Vec::new(),
    };
    let dst_stale = dst.stale.iter().map(|(p, _)| p.clone()).collect();
    let mut learned = Vec::new();
    for (table, tree, stale, fresh) in [
        (Table::Source, &src_tree, src.stale, [src_moved, src_fresh]),
        (Table::Replica, &dst_tree, dst.stale, [dst_moved, dst_fresh]),
    ] {
        // Paths below an unreadable directory were not seen, not removed.
        let stale = stale.into_iter().filter(|(p, _)| !tree.is_unknown(p));
        learned.extend(stale.map(|(p, _)| Update::Forget(table, p)));
        let fresh = fresh.into_iter().flatten();
        learned.extend(fresh.map(|(p, e)| Update::Put(table, p, e)));
    }
    log::debug!("hashed in {:?}", t.elapsed());
    rayon::join(
        || fill_tree_hashes(&mut src_tree.entries, caps.owners),
        || fill_tree_hashes(&mut dst_tree.entries, caps.owners),
    );
    let scanned = Scanned {
        src: src_tree,
        dst: dst_tree,
        src_seen: src.seen,
        dst_seen: dst.seen,
        contents,
        dst_stale,
    };
    Ok((scanned, learned))
}

/// Diffs the kept trees and plans. Replica files that the merge dropped as unchanged can still
/// be copy sources: a wanted content that no kept replica file has is looked up in what the
/// merge remembers of them, and when that cannot tell (a small file), in the recorded replica
/// table. The plan takes the kept source tree, whose entries its operations refer to.
fn make_plan(cfg: &Config, s: &mut Scanned, snapshot: &Snapshot) -> Result<Plan> {
    let plan = draft_plan(cfg, s, snapshot)?;
    Ok(plan.with_source(std::mem::take(&mut s.src.entries)))
}

fn draft_plan(cfg: &Config, s: &Scanned, snapshot: &Snapshot) -> Result<Draft> {
    let caps = replica_caps(cfg);
    // Unknown on either side (unreadable, or a mount inside the replica): left as it is.
    let changes = diff(&s.src.entries, &s.dst.entries, caps.owners, &|p| {
        s.src.is_unknown(p) || s.dst.is_unknown(p)
    });
    let kept_hashes: HashSet<Hash> = s
        .dst
        .entries
        .iter()
        .filter_map(|(_, e)| e.file_hash())
        .collect();
    let mut copy_sources = Vec::new();
    let mut unknown = HashSet::new();
    for c in &changes {
        let (Change::Add { src, .. } | Change::Modify { src, .. } | Change::Type { src, .. }) = c
        else {
            continue;
        };
        let (Some(h), None) = (src.file_hash(), &src.link) else {
            continue;
        };
        // An empty file is as quick to write as to copy.
        if src.size() == 0 || kept_hashes.contains(&h) {
            continue;
        }
        match s.contents.lookup(&h, src.size()) {
            merge::Lookup::Found(found) => copy_sources.push(found.clone()),
            merge::Lookup::Unknown => {
                unknown.insert(h);
            }
            merge::Lookup::Absent => {}
        }
    }
    if !unknown.is_empty() {
        for (path, e) in snapshot.files_with_hashes(Table::Replica, &unknown)? {
            if s.dst.get(&path).is_none() && !s.dst_stale.contains(&path) {
                copy_sources.push((path, e));
            }
        }
    }
    Ok(plan_with(
        &changes,
        &s.src.entries,
        &s.dst.entries,
        &copy_sources,
        &caps,
    ))
}

fn describe_problems(report: &mut Report, s: &Scanned) {
    for p in s.src.problems.iter().chain(&s.dst.problems) {
        let path = shown(&p.path).to_string();
        let message = format!(
            "cannot read {path}: {}; it is left as it was in the replica",
            p.error
        );
        let kind = ErrorKind::of(&p.error);
        report.scan_errors.push(PathError::new(path, kind, message));
    }
    // Source nodes the replica cannot hold are problems of this pass too, counted alike.
    let refused = report.plan.unsupported.clone();
    report.scan_errors.extend(refused);
    report.skipped = s.src.specials.clone();
    report.files_hashed = s.src.hashed_files + s.dst.hashed_files;
    report.bytes_hashed = s.src.hashed_bytes + s.dst.hashed_bytes;
}

/// `status` and `sync --dry-run`: what a sync would do, and whether its guard rails would
/// refuse it, without writing anything anywhere. With `cfg.reindex` the index is not read at
/// all: the plan is the one a `sync --reindex` would make.
pub fn status(cfg: &Config) -> Result<Report> {
    let start = Instant::now();
    let roots = Roots {
        source: &cfg.roots.source,
        replica: &cfg.roots.replica,
    };
    let index = if cfg.reindex {
        ReadIndex::empty(&cfg.index)
    } else {
        match ReadIndex::open(&cfg.index, &roots) {
            // Read-only, it cannot be repaired: plan without it, as a `--reindex` would.
            Err(e @ Error::IndexNeedsRepair { .. }) => {
                log::warn!("{e}; planned without it (every file is hashed)");
                ReadIndex::empty(&cfg.index)
            }
            other => other?,
        }
    };
    let snapshot = index.snapshot()?;
    let fs = recorded_fs(index.meta_value(FS_TRAITS)?);
    let source = open_source(&cfg.roots.source)?;
    cfg.roots.check_source(source.as_fd())?;
    // Read-only: the replica is held for the scan, not locked.
    let replica = ReplicaRoot::open(&cfg.roots.replica).map_err(|e| Error::io(roots.replica, e))?;
    if let Some(r) = &replica {
        cfg.roots.check_replica(r.fd())?;
    }
    let roots = (
        source_root(cfg, source.as_fd()),
        replica.as_ref().map(replica_root),
    );
    let (mut s, _) = scan_both(cfg, &snapshot, roots, fs, &mut Discard)?;
    let plan = make_plan(cfg, &mut s, &snapshot)?;
    let mut report = Report {
        refused: guard_rails(cfg, &s, &plan),
        plan,
        ..Report::default()
    };
    describe_problems(&mut report, &s);
    report.elapsed = start.elapsed();
    Ok(report)
}

/// What the index recorded of the replica's filesystem; what most filesystems keep when it
/// recorded nothing (or something unreadable, which the next sync probes again).
fn recorded_fs(value: Option<Vec<u8>>) -> FsTraits {
    value
        .and_then(|v| FsTraits::from_bytes(&v))
        .unwrap_or_default()
}

/// Opens the source root (its canonical path) to hold it for one pass, following no symlink on
/// the way: one there now was put there after the path was resolved, and is not followed.
pub(crate) fn open_source(path: &Path) -> Result<OwnedFd> {
    scan::open_root(path).map_err(|e| match e.raw_os_error() {
        _ if e.kind() == std::io::ErrorKind::NotFound => Error::BadInput {
            msg: format!(
                "source {} does not exist; check the path (is the disk mounted?)",
                path.display()
            ),
        },
        Some(c) if c == rustix::io::Errno::LOOP.raw_os_error() => Error::BadInput {
            msg: format!(
                "source {} was replaced by a symlink (or one was put on its path) after it was \
                 resolved; it is not followed, nothing was synced; run again to mirror what \
                 the path names now",
                path.display()
            ),
        },
        _ => Error::io(path, e),
    })
}

fn source_root<'a>(cfg: &'a Config, fd: BorrowedFd<'a>) -> Root<'a> {
    Root {
        path: &cfg.roots.source,
        fd,
    }
}

fn replica_root(root: &ReplicaRoot) -> Root<'_> {
    Root {
        path: root.path(),
        fd: root.fd(),
    }
}

/// Takes the replica's lock on its held root, or says who has it.
pub(crate) fn lock(root: &ReplicaRoot) -> Result<()> {
    match root.try_lock() {
        Ok(true) => Ok(()),
        Ok(false) => Err(Error::ReplicaLocked {
            path: root.path().to_path_buf(),
        }),
        // Some filesystems (NFS) refuse `flock` on a directory; the index lock still holds.
        Err(e) => {
            log::info!("cannot lock replica {}: {e}", root.path().display());
            Ok(())
        }
    }
}

/// A replica opened for syncing: holds its root directory (every pass works beneath it) and
/// the replica's lock, and the index (with the index's single-writer lock).
pub struct Session {
    cfg: Config,
    /// `None` until the replica exists (a sync creates it).
    root: Option<ReplicaRoot>,
    index: Index,
    /// The log file, and the other sinks every pass's events go to (see [`Session::add_sink`]).
    log: OpLog,
    sinks: Fanout,
    /// Whether a pass that did nothing is reported: its summary logged and sent to the sinks.
    /// A `watch` says no, and then does not send the summary of a pass that only failed again
    /// as the one before it did either.
    log_idle: bool,
    /// What the last pass reported as problems, in order.
    last_problems: Vec<String>,
}

/// The session's sinks as one: the log file, then the others.
struct Chain<'a>(&'a mut OpLog, &'a mut Fanout);

impl Sink for Chain<'_> {
    fn event(&mut self, e: &Event) {
        self.0.event(e);
        self.1.event(e);
    }
}

impl Session {
    /// Takes the replica (when it exists: a sync creates it otherwise) and opens the index.
    /// Fails at once if another process holds either.
    pub fn open(cfg: &Config) -> Result<Session> {
        let path = &cfg.roots.replica;
        let root = ReplicaRoot::open(path).map_err(|e| Error::io(path, e))?;
        if let Some(root) = &root {
            cfg.roots.check_replica(root.fd())?;
            lock(root)?;
        }
        let sinks = (OpLog::open(cfg.log_file.as_deref())?, Fanout::default());
        Self::open_index(cfg, root, sinks)
    }

    fn open_index(
        cfg: &Config,
        root: Option<ReplicaRoot>,
        (log, sinks): (OpLog, Fanout),
    ) -> Result<Session> {
        let roots = Roots {
            source: &cfg.roots.source,
            replica: &cfg.roots.replica,
        };
        let index = Index::open(&cfg.index, &roots, cfg.reindex)?;
        Ok(Session {
            cfg: cfg.clone(),
            root,
            index,
            log,
            sinks,
            log_idle: true,
            last_problems: Vec::new(),
        })
    }

    /// The same session for another source (a source link that now points elsewhere): the
    /// index is opened again for `cfg`, the replica stays held and locked, the sinks stay.
    pub fn with_source(self, cfg: &Config) -> Result<Session> {
        let Session {
            root,
            index,
            log,
            sinks,
            log_idle,
            last_problems,
            ..
        } = self;
        // The index allows one writer: this one goes before it is opened again.
        drop(index);
        let mut session = Self::open_index(cfg, root, (log, sinks))?;
        session.log_idle = log_idle;
        session.last_problems = last_problems;
        Ok(session)
    }

    /// Sends the events of every later pass to `sink` too (after the log file).
    pub fn add_sink(&mut self, sink: Box<dyn Sink + Send>) {
        self.sinks.push(sink);
    }

    /// Whether a pass that did nothing is reported (`watch` says no; see `log_idle`).
    pub fn log_idle_passes(&mut self, yes: bool) {
        self.log_idle = yes;
    }

    /// The replica root this session holds, once the replica exists.
    pub fn replica(&self) -> Option<&ReplicaRoot> {
        self.root.as_ref()
    }

    /// Creates the replica root if it does not exist yet, then holds and locks it.
    pub fn hold_replica(&mut self) -> Result<&ReplicaRoot> {
        if self.root.is_none() {
            let path = &self.cfg.roots.replica;
            let root = ReplicaRoot::create(path).map_err(|e| Error::io(path, e))?;
            lock(&root)?;
            self.root = Some(root);
        }
        Ok(self.root.as_ref().expect("just set"))
    }

    /// Tells the sinks that no pass ran, or that one was refused: why ([`Event::Unsynced`]).
    pub fn unsynced(&mut self, why: &str) {
        Chain(&mut self.log, &mut self.sinks).event(&Event::Unsynced(why));
    }

    /// What the replica's filesystem keeps: probed the first time and recorded in the index. The
    /// probe leaves the root's times as they were, so it is not a change.
    fn replica_fs(&self, held: &ReplicaRoot) -> Result<FsTraits> {
        if let Some(fs) = self
            .index
            .meta_value(FS_TRAITS)?
            .and_then(|v| FsTraits::from_bytes(&v))
        {
            return Ok(fs);
        }
        let fs = probe::probe_keeping_times(held.fd());
        if fs != FsTraits::default() {
            log::info!(
                "the replica's filesystem keeps times to {} ns{}; compared at that precision",
                fs.mtime_grain_ns,
                if fs.case_insensitive {
                    " and does not tell names apart by case"
                } else {
                    ""
                }
            );
        }
        self.index.set_meta_value(FS_TRAITS, &fs.to_bytes())?;
        Ok(fs)
    }

    /// One full pass: after it, the replica mirrors the source as scanned, except for the paths
    /// reported as errors.
    pub fn sync(&mut self, stop: &AtomicBool) -> Result<Report> {
        let source = open_source(&self.cfg.roots.source)?;
        self.sync_from(source.as_fd(), stop)
    }

    /// [`Session::sync`] from the source root `source`, held by the caller (the directory
    /// `cfg.roots.source` named when the caller checked it).
    pub fn sync_from(&mut self, source: BorrowedFd, stop: &AtomicBool) -> Result<Report> {
        let start = Instant::now();
        // The directory scanned is the one the checks were made on, not what the path names now.
        self.cfg.roots.check_source(source)?;
        Chain(&mut self.log, &mut self.sinks).event(&Event::Started);
        self.hold_replica()?;
        let cfg = &self.cfg;
        let held = self.root.as_ref().expect("held above");
        let fs = self.replica_fs(held)?;
        let snapshot = self.index.snapshot()?;
        let roots = (source_root(cfg, source), Some(replica_root(held)));
        let mut chain = Chain(&mut self.log, &mut self.sinks);
        let (mut s, learned) = scan_both(cfg, &snapshot, roots, fs, &mut chain)?;
        log::debug!("scanned in {:?}", start.elapsed());
        let plan = make_plan(cfg, &mut s, &snapshot)?;
        // Pages the snapshot still sees cannot be reused by the commits below.
        drop(snapshot);
        // The plan holds what it needs of the replica tree.
        s.dst.entries = Vec::new();
        log::debug!("planned in {:?}", start.elapsed());
        if let Some(msg) = guard_rails(cfg, &s, &plan) {
            return Err(Error::Refused { msg });
        }

        let mut rec = Recorder::new(Some(&self.index));
        for u in learned {
            rec.push(u);
        }
        log::debug!("scan recorded in {:?}", start.elapsed());
        let fd = held.try_clone().map_err(|e| Error::io(held.path(), e))?;
        let replica = LocalReplica::with_root(fd, cfg.owners);
        chain.event(&Event::Planned {
            ops: plan.ops.len() as u64,
            bytes: plan.bytes_to_copy,
        });
        let root = source_root(cfg, source);
        let outcome = apply(&plan, &replica, root, &mut rec, &mut chain, stop)?;
        let mut report = Report {
            plan,
            outcome,
            ..Report::default()
        };
        describe_problems(&mut report, &s);
        report.elapsed = start.elapsed();
        self.finish_pass(&mut report);
        Ok(report)
    }

    /// Sends the end of a pass to the sinks: its skipped files, its scan problems and (unless
    /// it is not reported, see `log_idle`) its summary.
    fn finish_pass(&mut self, report: &mut Report) {
        let problems: Vec<String> = (report.scan_errors.iter())
            .chain(&report.outcome.errors)
            .map(|e| e.message.clone())
            .collect();
        report.repeated = report.outcome.done.total() == 0
            && !problems.is_empty()
            && problems == self.last_problems;
        self.last_problems = problems;
        let mut chain = Chain(&mut self.log, &mut self.sinks);
        for p in &report.skipped {
            chain.event(&Event::Skipped(p));
        }
        for e in &report.scan_errors {
            chain.event(&Event::Problem(e));
        }
        let idle = report.is_idle();
        let summary = report.totals();
        let end = Event::Summary {
            summary: &summary,
            plan: &report.plan,
        };
        if self.log_idle || !idle {
            self.log.event(&end);
        }
        if self.log_idle || !(idle || report.repeated) {
            self.sinks.event(&end);
        }
    }
}

fn guard_rails(cfg: &Config, s: &Scanned, plan: &Plan) -> Option<String> {
    // A source root that vanished while it was opened is not an empty source, whatever the
    // flags. (One that cannot be read is unknown: nothing below it is touched.)
    if s.src_seen == 0 && s.src.unknown.is_empty() {
        return Some(format!(
            "source {} cannot be read (gone while it was scanned?); nothing was changed",
            cfg.roots.source.display()
        ));
    }
    let src_empty = s.src_seen <= 1 && s.src.unknown.is_empty();
    let dst_files = s.dst_seen.saturating_sub(1);
    if src_empty && dst_files > 0 && !cfg.allow_empty_source {
        return Some(format!(
            "source {} is empty but replica {} holds {dst_files} entries; refusing to delete them all \
             (an unmounted disk looks like this); pass --allow-empty-source if this is intended",
            cfg.roots.source.display(),
            cfg.roots.replica.display()
        ));
    }
    if let Some(max) = cfg.max_delete {
        let n = plan.removals();
        if n > max {
            return Some(format!(
                "this sync would delete {n} entries from replica {}, more than --max-delete {max}; \
                 nothing was changed; check the source, or raise the limit",
                cfg.roots.replica.display()
            ));
        }
    }
    None
}
