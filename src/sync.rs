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
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use crate::apply::{Outcome, Recorder, apply};
use crate::config::Config;
use crate::diff::{Change, diff};
use crate::entry::{Hash, RelPath};
use crate::error::{Error, Result};
use crate::hash::fill_tree_hashes;
use crate::index::{Index, ReadIndex, Roots, Snapshot, Table, Update};
use crate::merge;
use crate::oplog::OpLog;
use crate::plan::{Code, Draft, Plan, plan_with};
use crate::replica::local::LocalReplica;
use crate::scan::{self, Tree};

/// What one pass found and did.
#[derive(Debug, Default)]
pub struct Report {
    pub plan: Plan,
    pub outcome: Outcome,
    /// Problems met while scanning (unreadable paths), already described.
    pub scan_errors: Vec<String>,
    /// Special files in the source that were skipped.
    pub skipped: Vec<RelPath>,
    pub files_hashed: u64,
    pub bytes_hashed: u64,
    pub elapsed: Duration,
}

impl Report {
    pub fn error_count(&self) -> usize {
        self.scan_errors.len() + self.outcome.errors.len()
    }

    /// The one-line summary printed after a sync and logged.
    pub fn summary(&self) -> String {
        let p = &self.plan;
        format!(
            "synced: {} created, {} modified, {} deleted, {} moved, {} copied, {} metadata, {} copied, {} errors in {:.2}s",
            p.count(Code::Add),
            p.count(Code::Modify) + p.count(Code::Type),
            p.count(Code::Delete),
            p.count(Code::Move),
            p.count(Code::Copy),
            p.count(Code::Meta),
            human_bytes(self.outcome.bytes_written),
            self.error_count(),
            self.elapsed.as_secs_f64()
        )
    }
}

pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
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

/// Scans both trees (see [`merge::scan`]), then hashes what must be hashed. Returns the kept
/// parts of the trees and what the index should learn from the scan.
fn scan_both(cfg: &Config, snapshot: &Snapshot) -> Result<(Scanned, Vec<Update>)> {
    let roots = &cfg.roots;
    let t = Instant::now();
    let merge::Merged { src, dst, contents } =
        merge::scan(&roots.source, &roots.replica, snapshot, cfg.owners)?;
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
    let src_fresh = scan::hash_files(&roots.source, &mut src_tree, &src_need);
    let dst_fresh = scan::hash_files(&roots.replica, &mut dst_tree, &dst_need);
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
        || fill_tree_hashes(&mut src_tree.entries, cfg.owners),
        || fill_tree_hashes(&mut dst_tree.entries, cfg.owners),
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
    let changes = diff(&s.src.entries, &s.dst.entries, cfg.owners, &|p| {
        s.src.is_unknown(p)
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
        cfg.owners,
    ))
}

fn describe_problems(report: &mut Report, s: &Scanned) {
    for p in s.src.problems.iter().chain(&s.dst.problems) {
        report.scan_errors.push(format!(
            "cannot read {}: {}; it is left as it was in the replica",
            p.path.display(),
            p.error
        ));
    }
    report.skipped = s.src.specials.clone();
    report.files_hashed = s.src.hashed_files + s.dst.hashed_files;
    report.bytes_hashed = s.src.hashed_bytes + s.dst.hashed_bytes;
}

/// `status` and `sync --dry-run`: what a sync would do, without writing anything anywhere.
pub fn status(cfg: &Config) -> Result<Report> {
    let start = Instant::now();
    let roots = Roots {
        source: &cfg.roots.source,
        replica: &cfg.roots.replica,
    };
    let snapshot = ReadIndex::open(&cfg.index, &roots)?.snapshot()?;
    let (mut s, _) = scan_both(cfg, &snapshot)?;
    let mut report = Report {
        plan: make_plan(cfg, &mut s, &snapshot)?,
        ..Report::default()
    };
    describe_problems(&mut report, &s);
    report.elapsed = start.elapsed();
    Ok(report)
}

/// A replica opened for syncing: holds the index (and with it the single-writer lock).
pub struct Session {
    cfg: Config,
    index: Index,
    log: OpLog,
}

impl Session {
    pub fn open(cfg: &Config) -> Result<Session> {
        let roots = Roots {
            source: &cfg.roots.source,
            replica: &cfg.roots.replica,
        };
        let index = Index::open(&cfg.index, &roots, cfg.reindex)?;
        let log = OpLog::open(cfg.log_file.as_deref())?;
        Ok(Session {
            cfg: cfg.clone(),
            index,
            log,
        })
    }

    /// Writes an error line to the operation log.
    pub fn log_error(&mut self, msg: &str) {
        self.log.error(msg);
    }

    /// One full pass: after it, the replica mirrors the source as scanned, except for the paths
    /// reported as errors.
    pub fn sync(&mut self, stop: &AtomicBool) -> Result<Report> {
        let start = Instant::now();
        let cfg = &self.cfg;
        let replica_root = &cfg.roots.replica;
        if !replica_root.exists() {
            std::fs::create_dir_all(replica_root).map_err(|e| Error::io(replica_root, e))?;
        }
        let snapshot = self.index.snapshot()?;
        let (mut s, learned) = scan_both(cfg, &snapshot)?;
        log::debug!("scanned in {:?}", start.elapsed());
        let plan = make_plan(cfg, &mut s, &snapshot)?;
        // Pages the snapshot still sees cannot be reused by the commits below.
        drop(snapshot);
        // The plan holds what it needs of the replica tree.
        s.dst.entries = Vec::new();
        log::debug!("planned in {:?}", start.elapsed());
        guard_rails(cfg, &s, &plan)?;

        let mut rec = Recorder::new(Some(&self.index));
        for u in learned {
            rec.push(u);
        }
        log::debug!("scan recorded in {:?}", start.elapsed());
        let replica =
            LocalReplica::open(replica_root, cfg.owners).map_err(|e| Error::io(replica_root, e))?;
        let outcome = apply(
            &plan,
            &replica,
            &cfg.roots.source,
            &mut rec,
            &mut self.log,
            stop,
        )?;
        let mut report = Report {
            plan,
            outcome,
            ..Report::default()
        };
        describe_problems(&mut report, &s);
        for e in &report.scan_errors {
            self.log.error(e);
        }
        report.elapsed = start.elapsed();
        self.log.summary(&report.summary());
        Ok(report)
    }
}

fn guard_rails(cfg: &Config, s: &Scanned, plan: &Plan) -> Result<()> {
    let src_empty = s.src_seen <= 1 && s.src.unknown.is_empty();
    let dst_files = s.dst_seen.saturating_sub(1);
    if (src_empty || s.src_seen == 0) && dst_files > 0 && !cfg.allow_empty_source {
        return Err(Error::Refused {
            msg: format!(
                "source {} is empty but replica {} holds {dst_files} entries; refusing to delete them all \
                 (an unmounted disk looks like this); pass --allow-empty-source if this is intended",
                cfg.roots.source.display(),
                cfg.roots.replica.display()
            ),
        });
    }
    if let Some(max) = cfg.max_delete {
        let n = plan.removals();
        if n > max {
            return Err(Error::Refused {
                msg: format!(
                    "this sync would delete {n} entries from replica {}, more than --max-delete {max}; \
                     nothing was changed; check the source, or raise the limit",
                    cfg.roots.replica.display()
                ),
            });
        }
    }
    Ok(())
}
