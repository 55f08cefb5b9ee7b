//! The commands' sessions around the pass ([`crate::engine`]): `status`, and `sync` through a
//! [`Session`] that holds (and locks) the replica and the index across passes and sends each
//! pass's events to its sinks. The one place where the configured roots become backends is
//! here ([`source_backend`], [`replica_backend`]): today local directories; a remote replica
//! plugs in there.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

pub use crate::engine::Report;
pub use crate::event::human_bytes;

use crate::config::Config;
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::event::{Event, Fanout, Sink};
use crate::index::{FS_TRAITS, Index, ReadIndex, Roots};
use crate::oplog::OpLog;
use crate::replica::Replica;
use crate::replica::local::LocalReplica;
use crate::replica::probe::{self, FsTraits};
use crate::replica::root::ReplicaRoot;
use crate::scan::{self, Root};
use crate::source::{LocalSource, Source};

/// The source of a pass of `cfg`: the source root held (and checked) by the caller as `fd`.
pub fn source_backend<'a>(cfg: &'a Config, fd: BorrowedFd<'a>) -> Box<dyn Source + 'a> {
    let root = Root {
        path: &cfg.roots.source,
        fd,
    };
    Box::new(LocalSource::new(root))
}

/// The replica of a pass of `cfg`, beneath the root the command holds (and, to write, locks).
pub fn replica_backend(cfg: &Config, held: &ReplicaRoot) -> Result<Box<dyn Replica>> {
    let replica = LocalReplica::held(held, cfg.owners).map_err(|e| Error::io(held.path(), e))?;
    Ok(Box::new(replica))
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
    let src = source_backend(cfg, source.as_fd());
    let dst = replica
        .as_ref()
        .map(|r| replica_backend(cfg, r))
        .transpose()?;
    let mut report = Engine::new(cfg, &*src, dst.as_deref(), fs).status(&snapshot)?;
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
        let mut report = {
            let src = source_backend(cfg, source);
            let dst = replica_backend(cfg, held)?;
            let mut chain = Chain(&mut self.log, &mut self.sinks);
            let engine = Engine::new(cfg, &*src, Some(&*dst), fs);
            engine.sync(&self.index, &mut chain, stop)?
        };
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
