//! The operation log (`--log-file`), a [`Sink`] of a pass's events: one line per applied
//! operation, one `error ...` line per problem and one summary line per pass, each with an
//! RFC 3339 UTC timestamp, appended. `verify --repair` writes its own lines ([`OpLog::note`]).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::SystemTime;

use crate::error::{Error, Result};
use crate::event::{Event, Said, Sink};
use crate::plan::Op;

/// Appends to the log file, if there is one. Write errors are reported once and then ignored:
/// a full log disk must not stop the replica from being kept current.
#[derive(Default)]
pub struct OpLog {
    file: Option<File>,
    failed: bool,
    /// A problem that the previous pass logged too is not logged again (a `watch` retrying the
    /// same failure every second).
    said: Said,
}

impl OpLog {
    pub fn open(path: Option<&Path>) -> Result<OpLog> {
        let file = match path {
            None => None,
            Some(p) => Some(
                // The path was resolved and checked (`config::file_outside`): a symlink put in
                // its place since then is not followed.
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
                    .open(p)
                    .map_err(|e| Error::io(p, e))?,
            ),
        };
        Ok(OpLog {
            file,
            failed: false,
            said: Said::default(),
        })
    }

    fn line(&mut self, text: &str) {
        let Some(f) = self.file.as_mut() else { return };
        let ts = humantime::format_rfc3339_micros(SystemTime::now());
        if let Err(e) = writeln!(f, "{ts} {text}")
            && !self.failed
        {
            self.failed = true;
            log::warn!("cannot write to the log file: {e}");
        }
    }

    fn op(&mut self, op: &Op) {
        if self.file.is_none() {
            return;
        }
        let text = match op {
            Op::Stage { from, tmp } => format!("{} {from} -> {tmp}", op.letter()),
            Op::Rename { orig, to, .. } => format!("{} {orig} -> {to}", op.letter()),
            Op::Copy { from, to, .. } => format!("{} {from} -> {to}", op.letter()),
            Op::Link { leader, path, .. } => {
                format!("{} {path} (hard link to {leader})", op.letter())
            }
            other => format!("{} {}", other.letter(), other.target()),
        };
        self.line(&text);
    }

    /// An error line, unless the previous pass logged the same.
    fn problem(&mut self, msg: &str) {
        if self.said.is_new(msg) {
            self.error(msg);
        }
    }

    pub fn error(&mut self, msg: &str) {
        self.line(&format!("error {msg}"));
    }

    /// A line for something done outside a plan (`verify --repair`).
    pub fn note(&mut self, text: &str) {
        self.line(text);
    }
}

impl Sink for OpLog {
    fn event(&mut self, e: &Event) {
        match e {
            Event::Started => self.said.new_pass(),
            Event::Applied { op, .. } => self.op(op),
            Event::Failed(err) | Event::Problem(err) => self.problem(&err.message),
            Event::Fixed(err) => self.error(&err.message),
            Event::Unsynced(why) => self.error(why),
            Event::Summary { summary, .. } => self.line(&summary.line()),
            Event::Scanned { .. } | Event::Planned { .. } | Event::Skipped(_) => {}
        }
    }
}
