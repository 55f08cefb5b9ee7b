//! `watch`: a sync, a pause, and again, until Ctrl-C or SIGTERM. The index stays open and the
//! replica held and locked for the whole run. A pass that fails on some paths, or that a guard
//! rail refuses (an emptied source, too many deletions), does not end the loop: it is reported
//! and the next pass tries again. Only a fatal error (a damaged index) ends it.
//!
//! A pass runs only when both roots are the directories being watched:
//! - The replica root is the directory held since the start (see [`ReplicaRoot`]). When its
//!   path stops naming it (renamed, replaced by another directory or by a symlink), the watch
//!   pauses until the path names it again; it never follows the path.
//! - The source is resolved again at each pass. When SRC as given goes through a symlink (a
//!   release-style `current -> r1`), the link is followed every pass: a retargeted link is a new
//!   source, and its target is mirrored from then on. A source that is missing, not a
//!   directory, or another directory at the same resolved path (an unmounted disk leaving its
//!   mount point) pauses the watch, whatever `--allow-empty-source` says, until the directory
//!   is back. "The directory" is the one the first pass that ran synced from.
//!
//! A pause is reported once, when it begins. Passes that change nothing print and log nothing;
//! a heartbeat at info level, at most once an hour, says the watch is alive.

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use crate::config::{self, Config};
use crate::error::{Error, Result};
use crate::event::Sink;
use crate::nesting::DirId;
use crate::replica::root::ReplicaRoot;
use crate::scan;
use crate::sync::Session;

/// The shortest interval between the starts of two passes.
pub const MIN_INTERVAL: Duration = Duration::from_millis(100);

/// The longest: a week.
pub const MAX_INTERVAL: Duration = Duration::from_secs(7 * 24 * 3600);

/// At most one heartbeat line per this much idle time.
const HEARTBEAT: Duration = Duration::from_secs(3600);

/// Runs passes until `stop` is set; `sink` hears the events of every pass, and the summary
/// of every pass that changed something or had errors (not of one that only failed again as
/// the one before it did). Returns whether the watch ended in trouble: its last pass had
/// errors or was refused, or it was paused.
pub fn watch(cfg: &Config, stop: &AtomicBool, sink: Box<dyn Sink + Send>) -> Result<bool> {
    let mut session = Session::open(cfg)?;
    session.log_idle_passes(false);
    session.add_sink(sink);
    session.hold_replica()?;
    let mut w = Watch {
        source: Source::new(cfg),
        cfg: cfg.clone(),
        paused: None,
        idle: Idle::new(),
        troubled: false,
    };
    loop {
        let started = Instant::now();
        match check(&session, &w.source, &w.cfg)? {
            Ready::Paused(why) => w.pause(&mut session, why),
            Ready::Pass(fd) => w.pass(&mut session, &fd, stop)?,
            Ready::Retargeted(fd, new) => {
                // The index is opened again for the new source; the replica stays held.
                session = session.with_source(&new)?;
                w.adopt(new);
                w.pass(&mut session, &fd, stop)?;
            }
        }
        if stop.load(Ordering::Relaxed) {
            return Ok(w.troubled);
        }
        // Sleep in short steps so that a signal ends the wait at once.
        let until = started + w.cfg.interval;
        while Instant::now() < until {
            if stop.load(Ordering::Relaxed) {
                return Ok(w.troubled);
            }
            std::thread::sleep((until - Instant::now()).min(Duration::from_millis(50)));
        }
    }
}

/// The state of a running watch, besides its session.
struct Watch {
    source: Source,
    /// The configuration of the current source.
    cfg: Config,
    /// Why the watch is paused (already reported).
    paused: Option<String>,
    idle: Idle,
    /// Whether the last pass had errors or was refused, or the watch is paused.
    troubled: bool,
}

impl Watch {
    /// Reports a pause once, when it begins (or its reason changes).
    fn pause(&mut self, session: &mut Session, why: String) {
        if self.paused.as_ref() != Some(&why) {
            log::error!("{why}");
            session.unsynced(&why);
            self.troubled = true;
            self.paused = Some(why);
            self.idle.reset();
        }
    }

    /// The source link now resolves elsewhere: that is the source from now on.
    fn adopt(&mut self, new: Config) {
        if new.roots.source == self.source.resolved {
            log::warn!(
                "source {} is another directory than the one checked at the start (a disk \
                 mounted since?); checked again, mirroring it",
                self.source.arg.display()
            );
        } else {
            log::warn!(
                "source {} now resolves to {}; mirroring it",
                self.source.arg.display(),
                new.roots.source.display()
            );
        }
        self.source.adopt(new.roots.source.clone());
        self.cfg = new;
    }

    /// One pass from the source root `fd`; only a pass that did something is reported (the
    /// session sends its summary to the sinks).
    fn pass(&mut self, session: &mut Session, fd: &OwnedFd, stop: &AtomicBool) -> Result<()> {
        if self.paused.take().is_some() {
            log::warn!(
                "{} -> {}: both roots are back; resuming",
                self.source.arg.display(),
                self.cfg.roots.replica.display()
            );
        }
        match session.sync_from(fd.as_fd(), stop) {
            Ok(report) => {
                self.source.ran(fd);
                self.troubled = report.error_count() > 0;
                // A pass that only fails again as the last one did says nothing new: it is
                // reported once, then counted with the idle passes until something changes.
                if report.is_idle() || report.repeated {
                    self.idle.pass(&self.cfg);
                } else {
                    self.idle.reset();
                }
            }
            Err(Error::Refused { msg }) => {
                self.troubled = true;
                log::error!("{msg}; this pass changed nothing, watching on");
                session.unsynced(&msg);
                self.idle.reset();
            }
            Err(e) => return Err(e),
        }
        Ok(())
    }
}

/// What the checks before a pass found.
enum Ready {
    /// Both roots are the ones being watched: a pass runs from this source root.
    Pass(OwnedFd),
    /// The source link resolves elsewhere now: a pass runs from there, with this configuration.
    Retargeted(OwnedFd, Config),
    /// Why the watch pauses.
    Paused(String),
}

/// Checks both roots before a pass.
fn check(session: &Session, source: &Source, cfg: &Config) -> Result<Ready> {
    let replica: &ReplicaRoot = session.replica().expect("held from the start");
    if !replica.is_named_by_path() {
        return Ok(Ready::Paused(format!(
            "replica {} no longer names the directory being watched (replaced or a symlink); \
             paused; restore it or restart watch",
            replica.path().display()
        )));
    }
    let (fd, target) = match source.check(cfg.roots.source_id) {
        Ok(found) => found,
        Err(why) => return Ok(Ready::Paused(why)),
    };
    let Some(target) = target else {
        return Ok(Ready::Pass(fd));
    };
    Ok(match retarget(cfg, &target) {
        Ok(new) => Ready::Retargeted(fd, new),
        Err(e) => Ready::Paused(format!(
            "source {} now resolves to {}, which cannot be mirrored: {e}; paused",
            source.arg.display(),
            target.display()
        )),
    })
}

/// The configuration for a source that now resolves to `target`, checked as at the start.
fn retarget(cfg: &Config, target: &Path) -> Result<Config> {
    let mut roots = config::resolve_roots(target, &cfg.roots.replica)?;
    roots.source_arg = cfg.roots.source_arg.clone();
    config::file_outside(&cfg.index, &roots, "index")?;
    if let Some(log) = &cfg.log_file {
        config::file_outside(log, &roots, "log file")?;
    }
    Ok(Config {
        roots,
        ..cfg.clone()
    })
}

/// What the watch knows of its source.
struct Source {
    /// SRC as given, absolute.
    arg: PathBuf,
    /// Whether SRC as given goes through a symlink, which is then followed at each pass.
    via_link: bool,
    /// What SRC resolves to (the source being mirrored).
    resolved: PathBuf,
    /// Device and inode of the directory the last pass that ran synced from.
    pinned: Option<(u64, u64)>,
}

impl Source {
    fn new(cfg: &Config) -> Source {
        let arg = cfg.roots.source_arg.clone();
        Source {
            via_link: arg.ancestors().any(|p| p.is_symlink()),
            arg,
            resolved: cfg.roots.source.clone(),
            pinned: None,
        }
    }

    /// Opens the source root for a pass. Returns it, and the new target when a source link
    /// now resolves elsewhere; or why the watch pauses.
    /// `checked`: the source directory the configuration was validated with; another one, not
    /// yet synced from, is validated again before a pass runs from it (as a new target).
    fn check(&self, checked: DirId) -> std::result::Result<(OwnedFd, Option<PathBuf>), String> {
        let paused = |what: &str| {
            format!(
                "source {} {what}; paused, resuming when it is back",
                self.arg.display()
            )
        };
        let resolved = match self.via_link {
            true => std::fs::canonicalize(&self.arg),
            false => Ok(self.resolved.clone()),
        };
        let opened = resolved.and_then(|p| {
            // A canonical path has no symlink: one there now is not followed.
            let fd = scan::open_root(&p)?;
            let st = rustix::fs::fstat(&fd)?;
            Ok((p, fd, (st.st_dev, st.st_ino)))
        });
        let (resolved, fd, id) = match opened {
            Ok(found) => found,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(paused("is missing (unmounted?)"));
            }
            Err(e) if e.raw_os_error() == Some(rustix::io::Errno::NOTDIR.raw_os_error()) => {
                return Err(paused("is not a directory any more"));
            }
            Err(e) if e.raw_os_error() == Some(rustix::io::Errno::LOOP.raw_os_error()) => {
                return Err(paused("was replaced by a symlink, which is not followed"));
            }
            Err(e) => return Err(paused(&format!("cannot be opened ({e})"))),
        };
        if resolved != self.resolved {
            return Ok((fd, Some(resolved)));
        }
        if self.pinned.is_some_and(|p| p != id) {
            return Err(paused("was replaced by another directory (unmounted?)"));
        }
        if id != (checked.dev, checked.ino) {
            return Ok((fd, Some(resolved)));
        }
        Ok((fd, None))
    }

    /// A retargeted link: the new target is the source, with an identity of its own.
    fn adopt(&mut self, target: PathBuf) {
        self.resolved = target;
        self.pinned = None;
    }

    /// A pass ran from `fd`: that directory is the source from now on.
    fn ran(&mut self, fd: &OwnedFd) {
        if self.pinned.is_none()
            && let Ok(st) = rustix::fs::fstat(fd)
        {
            self.pinned = Some((st.st_dev, st.st_ino));
        }
    }
}

/// Idle passes since the watch last said something.
struct Idle {
    passes: u64,
    since: SystemTime,
    last: Instant,
}

impl Idle {
    fn new() -> Idle {
        Idle {
            passes: 0,
            since: SystemTime::now(),
            last: Instant::now(),
        }
    }

    fn reset(&mut self) {
        *self = Idle::new();
    }

    /// One more idle pass; at most once per [`HEARTBEAT`], a line at info level.
    fn pass(&mut self, cfg: &Config) {
        self.passes += 1;
        if let Some(line) = self.heartbeat(Instant::now()) {
            log::info!(
                "{line} ({} -> {})",
                cfg.roots.source.display(),
                cfg.roots.replica.display()
            );
        }
    }

    fn heartbeat(&mut self, now: Instant) -> Option<String> {
        if now.duration_since(self.last) < HEARTBEAT {
            return None;
        }
        let line = format!(
            "watching: {} passes since {}, nothing changed",
            self.passes,
            humantime::format_rfc3339_seconds(self.since)
        );
        self.reset();
        Some(line)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_heartbeat_comes_at_most_once_an_hour() {
        let mut idle = Idle::new();
        let t0 = idle.last;
        idle.passes = 3599;
        assert_eq!(idle.heartbeat(t0 + Duration::from_secs(3599)), None);
        idle.passes += 1;
        let line = idle
            .heartbeat(t0 + HEARTBEAT)
            .expect("an hour of idle passes");
        assert!(line.starts_with("watching: 3600 passes since "), "{line}");
        assert!(line.ends_with(", nothing changed"), "{line}");
        assert_eq!(idle.passes, 0);
        assert_eq!(idle.heartbeat(idle.last + Duration::from_secs(60)), None);
    }
}
