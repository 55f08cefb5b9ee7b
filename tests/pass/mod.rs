//! The real pass for the model tests: [`Engine::sync`] (the merge with its index cursors, inode
//! reuse, the copy-source lookup, the plan and apply) from a local source into a
//! `MemoryReplica` (or any other replica), with an [`Index`] in a temporary file that lives as long as the pair. A
//! cut pass is the same pass stopped by its stop flag after some operations were applied.
#![allow(dead_code)]

use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use dirsync::config::{Config, resolve_roots};
use dirsync::engine::{Engine, Report};
use dirsync::event::{Event, Sink};
use dirsync::index::{Index, Roots};
use dirsync::oplog::OpLog;
use dirsync::replica::Replica;
use dirsync::replica::probe::FsTraits;
use dirsync::scan::{self, Root};
use dirsync::source::LocalSource;

/// A source directory, the index of its passes into one replica, and the source root held
/// open as the binary holds it.
pub struct Pair {
    cfg: Config,
    index: Index,
    root: OwnedFd,
    _index_dir: tempfile::TempDir,
}

impl Pair {
    /// Passes from `src`, recorded in a new index; `owners` as `--owners`. The model may delete
    /// everything: the empty-source guard rail is off. The index lives on a tmpfs where there
    /// is one, so that the commit of every pass (an fsync) costs the model tests no disk time.
    pub fn new(src: &Path, owners: bool) -> Pair {
        let shm = Path::new("/dev/shm");
        let index_dir = match shm.is_dir() {
            true => tempfile::tempdir_in(shm),
            false => tempfile::tempdir(),
        }
        .unwrap();
        let roots = resolve_roots(src, &src.with_file_name("memory-replica")).unwrap();
        let cfg = Config {
            index: index_dir.path().join("index.redb"),
            roots,
            log_file: None,
            reindex: false,
            allow_empty_source: true,
            max_delete: None,
            owners,
            interval: std::time::Duration::ZERO,
        };
        let index = Index::open(
            &cfg.index,
            &Roots {
                source: &cfg.roots.source,
                replica: &cfg.roots.replica,
            },
            false,
        )
        .unwrap();
        let root = scan::open_root(&cfg.roots.source).unwrap();
        Pair {
            cfg,
            index,
            root,
            _index_dir: index_dir,
        }
    }

    /// One pass into `replica`, stopped by its stop flag once `stop_after` operations were
    /// applied. An error of the pass as a whole (not a per-path one) is returned as a message.
    pub fn sync(&self, replica: &dyn Replica, stop_after: Option<u64>) -> Result<Report, String> {
        let source = LocalSource::new(Root {
            path: &self.cfg.roots.source,
            fd: self.root.as_fd(),
        });
        let engine = Engine::new(&self.cfg, &source, Some(replica), FsTraits::default());
        let stop = AtomicBool::new(false);
        let mut sink = StopAfter {
            left: stop_after,
            stop: &stop,
            log: OpLog::default(),
        };
        engine
            .sync(&self.index, &mut sink, &stop)
            .map_err(|e| format!("the pass failed: {e}"))
    }
}

/// Passes events on to an operation log, and raises the stop flag after `left` operations.
struct StopAfter<'a> {
    left: Option<u64>,
    stop: &'a AtomicBool,
    log: OpLog,
}

impl Sink for StopAfter<'_> {
    fn event(&mut self, e: &Event) {
        if let (Event::Applied { .. }, Some(n)) = (e, &mut self.left) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.stop.store(true, Ordering::SeqCst);
            }
        }
        self.log.event(e);
    }
}

/// Waits until what was changed before now is outside the racy window of the source's
/// filesystem (20 ms on ext4 and tmpfs) and of a POSIX memory replica: records taken after
/// this are trusted by the next pass.
pub fn past_racy_window() {
    std::thread::sleep(std::time::Duration::from_millis(25));
}
