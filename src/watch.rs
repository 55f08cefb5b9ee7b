//! `watch`: a sync, a pause, and again, until Ctrl-C or SIGTERM. The index stays open (and the
//! replica locked) for the whole run. A pass that fails on some paths, or that a guard rail
//! refuses (an emptied source, too many deletions), does not end the loop: it is reported and
//! the next pass tries again. Only a fatal error (a damaged index) ends it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::sync::{Report, Session};

/// Runs passes until `stop` is set; `each` sees every pass's report. Returns the number of
/// passes that had errors.
pub fn watch(cfg: &Config, stop: &AtomicBool, mut each: impl FnMut(&Report)) -> Result<u64> {
    let mut session = Session::open(cfg)?;
    let mut failed = 0;
    loop {
        let started = Instant::now();
        match session.sync(stop) {
            Ok(report) => {
                if report.error_count() > 0 {
                    failed += 1;
                }
                each(&report);
            }
            Err(Error::Refused { msg }) => {
                failed += 1;
                log::error!("{msg}; this pass changed nothing, watching on");
                session.log_error(&msg);
            }
            Err(e) => return Err(e),
        }
        if stop.load(Ordering::Relaxed) {
            return Ok(failed);
        }
        // Sleep in short steps so that a signal ends the wait at once.
        let until = started + cfg.interval;
        while Instant::now() < until {
            if stop.load(Ordering::Relaxed) {
                return Ok(failed);
            }
            std::thread::sleep((until - Instant::now()).min(Duration::from_millis(50)));
        }
    }
}
