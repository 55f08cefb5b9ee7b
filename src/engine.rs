//! The pass: one sync (or one `status`) of a [`Source`] into a [`Replica`], through their traits
//! only, so that it runs the same over a local directory, a tree in memory, or a remote
//! backend. Which backends a command's arguments name is decided in one place
//! (`sync::source_backend`, `sync::replica_backend`), not here; the engine never prints, it
//! tells a [`Sink`].
//!
//! Steps of one pass ([`Engine::sync`]; [`Engine::status`] stops after the third):
//! 1. Walk the source and the replica at the same time, one thread each, stat only, and stream
//!    each side's recorded table alongside to reuse hashes whose stamp still matches; keep
//!    only the paths that may differ ([`merge`]).
//! 2. Hash the kept files whose hash is not cached and whose size some file on the other side
//!    has (no other file can match them; the rest are hashed while they are copied).
//! 3. Tree hashes of the kept parts, diff, plan for what the replica can do
//!    ([`Replica::capabilities`]); guard rails.
//! 4. Record what the scans learned, apply the plan, record each finished operation.

use std::collections::HashSet;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use crate::apply::{Outcome, Recorder, apply};
use crate::config::Config;
use crate::diff::{Change, diff};
use crate::entry::{Hash, RelPath, shown};
use crate::error::{Error, ErrorKind, PathError, Result};
use crate::event::{Discard, Event, Shortfall, Sink, Summary};
use crate::hash::fill_tree_hashes;
use crate::index::{Index, Snapshot, Table, Update};
use crate::merge;
use crate::plan::{Code, Draft, Plan, plan_with};
use crate::replica::probe::FsTraits;
use crate::replica::{Capabilities, Replica};
use crate::scan::{self, Tree};
use crate::source::Source;

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
    /// Why a sync would refuse to apply this plan (a guard rail); set by [`Engine::status`] only, as
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

/// One pass of `cfg` from `source` into `replica` (`None`: it does not exist yet, and is
/// empty), planned for what the replica declares it can do and keep.
pub struct Engine<'a> {
    cfg: &'a Config,
    source: &'a dyn Source,
    replica: Option<&'a dyn Replica>,
    /// What the replica's filesystem was found to keep (timestamp grain, case).
    probed: FsTraits,
    caps: Capabilities,
}

impl<'a> Engine<'a> {
    /// The pass over `source` and `replica`. `probed` is what the replica's filesystem was
    /// found to keep. A replica that does not exist yet is a local directory that the sync
    /// creates (the one backend that can be missing): it is planned for as POSIX.
    pub fn new(
        cfg: &'a Config,
        source: &'a dyn Source,
        replica: Option<&'a dyn Replica>,
        probed: FsTraits,
    ) -> Engine<'a> {
        let caps = replica.map_or(Capabilities::posix(cfg.owners), |r| r.capabilities());
        Engine {
            cfg,
            source,
            replica,
            probed,
            caps,
        }
    }

    /// `status` and `sync --dry-run`: what a sync would do with the records of `snapshot`,
    /// and whether its guard rails would refuse it (`Report::refused`). Writes nothing.
    pub fn status(&self, snapshot: &Snapshot) -> Result<Report> {
        let start = Instant::now();
        let (mut s, _) = self.scan_both(snapshot, &mut Discard)?;
        let plan = self.make_plan(&mut s, snapshot)?;
        let mut report = Report {
            refused: self.guard_rails(&s, &plan),
            plan,
            ..Report::default()
        };
        describe_problems(&mut report, &s);
        report.elapsed = start.elapsed();
        Ok(report)
    }

    /// One full pass: after it, the replica mirrors the source as scanned, except for the
    /// paths reported as errors. A plan that a guard rail refuses is not applied
    /// ([`Error::Refused`]). The scan's progress, the plan and every operation go to `sink`,
    /// every finished operation is recorded in `index`; `stop` ends the pass between
    /// operations. The end of the pass (problems, summary) is the caller's to tell.
    pub fn sync(&self, index: &Index, sink: &mut dyn Sink, stop: &AtomicBool) -> Result<Report> {
        let start = Instant::now();
        let Some(replica) = self.replica else {
            return Err(Error::BadInput {
                msg: format!(
                    "replica {} does not exist; nothing was synced",
                    self.cfg.roots.replica.display()
                ),
            });
        };
        let snapshot = index.snapshot()?;
        let (mut s, learned) = self.scan_both(&snapshot, sink)?;
        log::debug!("scanned in {:?}", start.elapsed());
        let plan = self.make_plan(&mut s, &snapshot)?;
        // Pages the snapshot still sees cannot be reused by the commits below.
        drop(snapshot);
        // The plan holds what it needs of the replica tree.
        s.dst.entries = Vec::new();
        log::debug!("planned in {:?}", start.elapsed());
        if let Some(msg) = self.guard_rails(&s, &plan) {
            return Err(Error::Refused { msg });
        }
        let mut rec = Recorder::new(Some(index));
        for u in learned {
            rec.push(u);
        }
        log::debug!("scan recorded in {:?}", start.elapsed());
        sink.event(&Event::Planned {
            ops: plan.ops.len() as u64,
            bytes: plan.bytes_to_copy,
        });
        let outcome = apply(&plan, replica, self.source, &mut rec, sink, stop)?;
        let mut report = Report {
            plan,
            outcome,
            ..Report::default()
        };
        describe_problems(&mut report, &s);
        report.elapsed = start.elapsed();
        Ok(report)
    }

    /// Scans both trees (see [`merge::scan`]), then hashes what must be hashed. Returns the
    /// kept parts of the trees and what the index should learn from the scan. Source entries
    /// are compared as the replica keeps them ([`Capabilities::keep`]). `sink` hears the scan's
    /// progress.
    fn scan_both(
        &self,
        snapshot: &Snapshot,
        sink: &mut dyn Sink,
    ) -> Result<(Scanned, Vec<Update>)> {
        let t = Instant::now();
        let caps = self.caps;
        let fs = caps.traits(self.probed);
        let merge::Merged { src, dst, contents } = merge::scan(
            self.source,
            self.replica,
            snapshot,
            caps.owners,
            (fs, caps),
            sink,
        )?;
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
        let src_fresh = self.source.hash(&mut src_tree, &src_need);
        // Hashing took the files' metadata afresh (and dropped files that vanished): compare it as
        // the replica keeps it, as the merge did.
        if fs.mtime_grain_ns > 1 || caps != Capabilities::posix(caps.owners) {
            for (_, e) in &mut src_tree.entries {
                caps.keep(e, &fs);
            }
        }
        let dst_fresh = match self.replica {
            Some(r) => r.hash(&mut dst_tree, &dst_need),
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
    fn make_plan(&self, s: &mut Scanned, snapshot: &Snapshot) -> Result<Plan> {
        let plan = self.draft_plan(s, snapshot)?;
        Ok(plan.with_source(std::mem::take(&mut s.src.entries)))
    }

    fn draft_plan(&self, s: &Scanned, snapshot: &Snapshot) -> Result<Draft> {
        let caps = self.caps;
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
            let (Change::Add { src, .. } | Change::Modify { src, .. } | Change::Type { src, .. }) =
                c
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

    /// Why a sync must not apply `plan`, if it must not: a source that cannot be read or is
    /// empty against a replica that is not, or more removals than `--max-delete`.
    fn guard_rails(&self, s: &Scanned, plan: &Plan) -> Option<String> {
        let cfg = self.cfg;
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
}
