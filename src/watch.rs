//! `watch`: a sync, a pause, and again, until Ctrl-C or SIGTERM. The index stays open (and the
//! replica locked) for the whole run; a pass that fails on some paths does not end the loop.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::error::Result;
use crate::sync::{Report, Session};

/// Runs passes until `stop` is set; `each` sees every pass's report. Returns the number of
/// passes that had errors.
pub fn watch(cfg: &Config, stop: &AtomicBool, mut each: impl FnMut(&Report)) -> Result<u64> {
    let mut session = Session::open(cfg)?;
    let mut failed = 0;
    loop {
        let started = Instant::now();
        let report = session.sync(stop)?;
        if report.error_count() > 0 {
            failed += 1;
        }
        each(&report);
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
