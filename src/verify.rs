//! `verify`: every replica file re-read and compared with the hash recorded when dirsync wrote
//! it, every recorded file looked for; and `--repair`, which rewrites just the files found
//! wrong.
//!
//! Invariants:
//! - Verify creates nothing: a replica that does not exist (an unmounted disk) and a replica
//!   without an index are errors. Without `--repair`, and with `--dry-run`, the index is opened
//!   read-only and nothing is written anywhere.
//! - A recorded file that is corrupt (its bytes no longer hash to the record) or missing is a
//!   difference. A file the index has no record of is not: it is new to dirsync, not wrong.
//! - A repair writes only the differing files, and only from a source file that still holds
//!   exactly the recorded content (read as a sync reads it: not through a symlink, between two
//!   `fstat`s that agree), with the recorded metadata; a file whose source changed or is gone
//!   is reported and left for `dirsync sync`. Nothing else is deleted, moved or written,
//!   except the parent directories a missing file needs, and the directories whose entries
//!   changed get their metadata back. It is no sync: other pending changes stay pending.
//! - A dry run reads the source the same way, and exits as the repair would.
//! - The source is read only beneath its root, opened once (following no symlink on its
//!   canonical path) and held while the repair runs; no component of a path inside it is
//!   followed through a symlink ([`Source::open`]).
//! - The replica is walked, hashed and rewritten through the [`Replica`] trait only.

use std::collections::HashSet;
use std::io;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::apply::{restore_from_source, source_has, written};
use crate::config::Config;
use crate::entry::{Content, Entry, Kind, Meta, RelPath};
use crate::error::{Error, ErrorKind, PathError, Result};
use crate::index::{Index, ReadIndex, Roots, Table, Update};
use crate::oplog::OpLog;
use crate::replica::root::ReplicaRoot;
use crate::replica::{self, Replica};
use crate::scan::Tree;
use crate::source::Source;
use crate::sync::{replica_backend, source_backend};

/// What `verify` does about the differences it finds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Repair {
    No,
    /// Says what a repair would do; writes nothing.
    DryRun,
    Yes,
}

/// How a recorded replica file differs from its record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Its bytes no longer hash to the recorded hash.
    Corrupt,
    /// It is not in the replica (or is no longer a file).
    Missing,
}

impl Fault {
    /// Its name in lines and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Fault::Corrupt => "corrupt",
            Fault::Missing => "missing",
        }
    }
}

/// What became of a difference.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fix {
    /// No repair was asked for (or the run was stopped before it got there).
    Untried,
    Repaired,
    /// Could not be repaired; why, and the kind of failure.
    Failed(ErrorKind, String),
    /// Dry run: the source has the content, a repair would rewrite it.
    WouldRepair,
    /// Dry run: a repair could not rewrite it; why, and the kind of failure.
    WouldFail(ErrorKind, String),
}

/// One recorded file that differs.
#[derive(Debug)]
pub struct Difference {
    pub path: RelPath,
    pub fault: Fault,
    /// The index's record of it: the content and metadata it was written with.
    pub recorded: Entry,
    pub fix: Fix,
}

/// Why a repair cannot rewrite a file whose source changed or is gone.
const SOURCE_CHANGED: &str = "the source no longer has the content it was written with";

impl Difference {
    fn new(path: RelPath, fault: Fault, recorded: Entry) -> Difference {
        Difference {
            path,
            fault,
            recorded,
            fix: Fix::Untried,
        }
    }

    /// The line printed for it (stdout).
    pub fn line(&self) -> String {
        let (fault, repair, repaired) = match self.fault {
            Fault::Corrupt => ("corrupt", "repair", "repaired"),
            Fault::Missing => ("missing", "restore", "restored"),
        };
        let p = &self.path;
        match &self.fix {
            Fix::Untried | Fix::Failed(..) => format!("{fault} {p}"),
            Fix::Repaired => format!("{repaired} {p}"),
            Fix::WouldRepair => format!("would {repair} {p}"),
            Fix::WouldFail(_, why) => format!("cannot {repair} {p}: {why}"),
        }
    }

    /// The error of a failed repair: its path, kind and message.
    pub fn error(&self) -> Option<PathError> {
        let Fix::Failed(kind, why) = &self.fix else {
            return None;
        };
        let message = format!(
            "{} {}: {why}; run `dirsync sync` to bring it up to date",
            self.fault.as_str(),
            self.path
        );
        Some(PathError::new(&self.path, *kind, message))
    }

    /// What kind of problem this is: why a repair failed or would fail; else `not_found` for
    /// a missing file and `other` for a corrupt one.
    pub fn kind(&self) -> ErrorKind {
        match (&self.fix, self.fault) {
            (Fix::Failed(kind, _) | Fix::WouldFail(kind, _), _) => *kind,
            (_, Fault::Missing) => ErrorKind::NotFound,
            (_, Fault::Corrupt) => ErrorKind::Other,
        }
    }

    fn is_good_now(&self) -> bool {
        matches!(self.fix, Fix::Repaired | Fix::WouldRepair)
    }
}

/// What `verify` found, and with `--repair`, did.
#[derive(Debug, Default)]
pub struct Verified {
    pub files_checked: u64,
    pub bytes_checked: u64,
    /// Recorded files that differ, in canonical order.
    pub differences: Vec<Difference>,
    /// Replica files the index has no hash for (not written or verified by dirsync yet).
    pub unrecorded: Vec<RelPath>,
    /// Paths that could not be checked, and failures to record a repair, already described.
    pub errors: Vec<PathError>,
}

impl Verified {
    /// Whether the replica is now as recorded (with a dry run: would be after the repair).
    pub fn is_good(&self) -> bool {
        self.errors.is_empty() && self.differences.iter().all(Difference::is_good_now)
    }

    /// The summary line (stderr).
    pub fn summary(&self) -> String {
        let count = |f: Fault| self.differences.iter().filter(|d| d.fault == f).count();
        let fixes = |f: fn(&Fix) -> bool| self.differences.iter().filter(|d| f(&d.fix)).count();
        let mut s = format!(
            "verified {} files ({}): {} corrupt, {} missing, {} not recorded yet",
            self.files_checked,
            crate::sync::human_bytes(self.bytes_checked),
            count(Fault::Corrupt),
            count(Fault::Missing),
            self.unrecorded.len()
        );
        let (done, failed) = (
            fixes(|f| *f == Fix::Repaired),
            fixes(|f| matches!(f, Fix::Failed(..))),
        );
        let (would, would_not) = (
            fixes(|f| *f == Fix::WouldRepair),
            fixes(|f| matches!(f, Fix::WouldFail(..))),
        );
        if done + failed > 0 {
            s += &format!("; {done} repaired, {failed} could not be");
        }
        if would + would_not > 0 {
            s += &format!("; {would} would be repaired, {would_not} could not be");
        }
        s
    }
}

/// Runs `verify` (see the module documentation).
pub fn verify(cfg: &Config, mode: Repair, stop: &AtomicBool) -> Result<Verified> {
    let (src, dst) = (&cfg.roots.source, &cfg.roots.replica);
    // Held for the whole command: every read and write below is beneath this directory.
    let held = match ReplicaRoot::open(dst).map_err(|e| Error::io(dst, e))? {
        Some(root) if cfg.roots.replica_exists => root,
        _ => {
            return Err(Error::BadInput {
                msg: format!(
                    "replica {} does not exist; is the disk mounted? nothing was verified",
                    dst.display()
                ),
            });
        }
    };
    cfg.roots.check_replica(held.fd())?;
    let replica = replica_backend(cfg, &held)?;
    let roots = Roots {
        source: src,
        replica: dst,
    };
    let no_index = || Error::BadInput {
        msg: format!(
            "no index for this replica yet ({}); run `dirsync sync {} {}` first",
            cfg.index.display(),
            src.display(),
            dst.display()
        ),
    };
    if mode != Repair::Yes {
        let index = ReadIndex::open_existing(&cfg.index, &roots)?.ok_or_else(no_index)?;
        let tree = walk_hashed(&*replica);
        let mut v = compare(&tree, index.load(Table::Replica)?);
        if mode == Repair::DryRun && !v.differences.is_empty() {
            match crate::sync::open_source(src) {
                Ok(fd) => dry_run(&mut v, &*source_backend(cfg, fd.as_fd())),
                Err(e) => unrepairable(&mut v, &e, None),
            }
        }
        return Ok(v);
    }
    // A repair writes: one writer per replica, as for a sync.
    crate::sync::lock(&held)?;
    let index = Index::open_existing(&cfg.index, &roots)?.ok_or_else(no_index)?;
    let tree = walk_hashed(&*replica);
    let mut v = compare(&tree, index.load(Table::Replica)?);
    if !v.differences.is_empty() {
        let mut log = OpLog::open(cfg.log_file.as_deref())?;
        match crate::sync::open_source(src) {
            Ok(fd) => {
                let source = source_backend(cfg, fd.as_fd());
                repair(&mut v, &tree, &*replica, &*source, &index, &mut log, stop);
            }
            Err(e) => unrepairable(&mut v, &e, Some(&mut log)),
        }
    }
    Ok(v)
}

/// No difference can be repaired: the source root cannot be opened (`why`). With `log`, the
/// repair was asked for and each failure is logged; without, it is a dry run.
fn unrepairable(v: &mut Verified, why: &Error, mut log: Option<&mut OpLog>) {
    for d in &mut v.differences {
        let msg = format!("the source cannot be opened: {why}");
        match log.as_deref_mut() {
            None => d.fix = Fix::WouldFail(why.kind(), msg),
            Some(log) => {
                d.fix = Fix::Failed(why.kind(), msg);
                if let Some(e) = d.error() {
                    log.error(&e.message);
                }
            }
        }
    }
}

/// The whole replica tree, with every file read and hashed.
fn walk_hashed(replica: &dyn Replica) -> Tree {
    let mut tree = replica::walk_all(replica);
    let all: Vec<usize> = tree.unhashed().collect();
    replica.hash(&mut tree, &all);
    tree
}

/// Compares a walked and hashed replica `tree` with the `recorded` replica table (both in
/// canonical order).
pub fn compare(tree: &Tree, recorded: Vec<(RelPath, Entry)>) -> Verified {
    let mut v = Verified {
        files_checked: tree.hashed_files,
        bytes_checked: tree.hashed_bytes,
        ..Verified::default()
    };
    for p in &tree.problems {
        let path = p.path.display();
        let message = format!("cannot read {path}: {}", p.error);
        let kind = ErrorKind::of(&p.error);
        v.errors.push(PathError::new(path, kind, message));
    }
    let missing = |v: &mut Verified, path: RelPath, e: Entry| {
        // Below an unreadable directory, a path was not seen, not found missing.
        if !tree.is_unknown(&path) {
            v.differences.push(Difference::new(path, Fault::Missing, e));
        }
    };
    let mut rec = with_leader_hashes(recorded).into_iter().peekable();
    for (path, e) in &tree.entries {
        while let Some((p, r)) = rec.next_if(|(p, _)| p < path) {
            missing(&mut v, p, r);
        }
        let r = rec.next_if(|(p, _)| p == path).map(|(_, r)| r);
        match (&e.content, r) {
            (Content::File { hash: Some(h), .. }, Some(r)) => match r.file_hash() {
                Some(want) if want != *h => {
                    v.differences
                        .push(Difference::new(path.clone(), Fault::Corrupt, r));
                }
                Some(_) => {}
                // Nothing to compare with.
                None => v.unrecorded.push(path.clone()),
            },
            (Content::File { hash: Some(_), .. }, None) => v.unrecorded.push(path.clone()),
            (Content::File { hash: None, .. }, _) => v.errors.push(PathError::new(
                path,
                ErrorKind::ChangedWhileRead,
                format!("{path} changed while it was read and was not verified; run verify again"),
            )),
            (_, Some(r)) => missing(&mut v, path.clone(), r),
            (_, None) => {}
        }
    }
    for (p, r) in rec {
        missing(&mut v, p, r);
    }
    v
}

/// A hard link is recorded with its leader and without a hash of its own: it gets the leader's.
fn with_leader_hashes(mut recorded: Vec<(RelPath, Entry)>) -> Vec<(RelPath, Entry)> {
    for i in 0..recorded.len() {
        let Some(leader) = recorded[i].1.link.as_ref() else {
            continue;
        };
        let found = recorded.binary_search_by(|(p, _)| p.cmp(leader));
        let leader_hash = found.ok().and_then(|j| recorded[j].1.file_hash());
        if let (Content::File { hash: h @ None, .. }, Some(lh)) =
            (&mut recorded[i].1.content, leader_hash)
        {
            *h = Some(lh);
        }
    }
    recorded
}

/// `--repair --dry-run`: whether the source still has the content of each difference.
pub fn dry_run(v: &mut Verified, source: &dyn Source) {
    for d in &mut v.differences {
        d.fix = match source_has(source, &d.path, &d.recorded) {
            Ok(true) => Fix::WouldRepair,
            Ok(false) => Fix::WouldFail(ErrorKind::ChangedWhileRead, SOURCE_CHANGED.into()),
            Err(e) => Fix::WouldFail(
                ErrorKind::of(&e),
                format!("it cannot be read from the source: {e}"),
            ),
        };
    }
}

/// `--repair`: rewrites each difference from the source where the source still has its
/// content, records it, then gives the directories whose entries changed their metadata back.
/// `tree` is the replica as walked.
pub fn repair(
    v: &mut Verified,
    tree: &Tree,
    replica: &dyn Replica,
    source: &dyn Source,
    index: &Index,
    log: &mut OpLog,
    stop: &AtomicBool,
) {
    let mut updates = Vec::new();
    let mut repaired = HashSet::new();
    let mut created = Vec::new();
    for d in &mut v.differences {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        d.fix = match repair_one(d, tree, replica, source, &repaired, &mut created) {
            Ok(Some(e)) => {
                updates.push(Update::Put(Table::Replica, d.path.clone(), e));
                repaired.insert(d.path.clone());
                Fix::Repaired
            }
            Ok(None) => Fix::Failed(ErrorKind::ChangedWhileRead, SOURCE_CHANGED.into()),
            Err(e) => Fix::Failed(
                ErrorKind::of(&e),
                format!("it cannot be rewritten from the source: {e}"),
            ),
        };
        match d.error() {
            Some(e) => log.error(&e.message),
            None => log.note(&d.line()),
        }
    }
    let changed = repaired.iter().chain(&created);
    let mut dirs: Vec<RelPath> = changed.filter_map(RelPath::parent).collect();
    dirs.extend(created.iter().cloned());
    for e in restore_dirs(dirs, &created, tree, replica, source) {
        log.error(&e.message);
        v.errors.push(e);
    }
    if let Err(e) = index.commit(&updates) {
        v.errors
            .push(PathError::new(RelPath::root(), e.kind(), e.to_string()));
    }
}

/// Rewrites one differing file: a hard link whose leader was just repaired is linked to it
/// again; anything else comes from the source ([`restore_from_source`]). A missing file's
/// missing parent directories are created once the source is known to have its content.
/// `None`: the source no longer has that content.
fn repair_one(
    d: &Difference,
    tree: &Tree,
    replica: &dyn Replica,
    source: &dyn Source,
    repaired: &HashSet<RelPath>,
    created: &mut Vec<RelPath>,
) -> io::Result<Option<Entry>> {
    if let Some(leader) = d.recorded.link.as_ref().filter(|l| repaired.contains(*l)) {
        let fp = replica.hard_link(leader, &d.path)?;
        return Ok(Some(written(&d.recorded, d.recorded.content.clone(), fp)));
    }
    if d.fault == Fault::Missing {
        let parents = missing_parents(&d.path, tree, created);
        if !parents.is_empty() {
            if !source_has(source, &d.path, &d.recorded)? {
                return Ok(None);
            }
            for p in parents {
                replica.mkdir(&p)?;
                created.push(p);
            }
        }
    }
    restore_from_source(replica, source, &d.path, &d.recorded)
}

/// The proper ancestors of `path` that are not directories of the replica, parents first.
fn missing_parents(path: &RelPath, tree: &Tree, created: &[RelPath]) -> Vec<RelPath> {
    let mut out = Vec::new();
    let mut p = path.parent();
    while let Some(q) = p.filter(|q| !q.is_root()) {
        p = q.parent();
        let exists = tree.get(&q).is_some_and(Entry::is_dir) || created.contains(&q);
        if !exists {
            out.push(q);
        }
    }
    out.reverse();
    out
}

/// Gives each directory in `dirs` its metadata back, children first: the replica's own, as
/// walked, or the source directory's for those created by the repair. Returns the failures.
fn restore_dirs(
    mut dirs: Vec<RelPath>,
    created: &[RelPath],
    tree: &Tree,
    replica: &dyn Replica,
    source: &dyn Source,
) -> Vec<PathError> {
    dirs.sort_unstable_by(|a, b| b.cmp(a));
    dirs.dedup();
    let mut errors = Vec::new();
    for d in dirs {
        let meta: io::Result<Meta> = match tree.get(&d) {
            Some(e) if e.is_dir() && !created.contains(&d) => Ok(e.meta),
            _ => source.dir_meta(&d),
        };
        if let Err(e) = meta.and_then(|m| replica.set_meta(&d, Kind::Dir, &m)) {
            let message = format!(
                "cannot set the metadata of directory {d} in the replica: {e}; the next sync sets it"
            );
            errors.push(PathError::new(&d, ErrorKind::of(&e), message));
        }
    }
    errors
}
