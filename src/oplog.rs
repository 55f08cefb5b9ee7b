//! The operation log (`--log-file`): one line per applied operation and one summary line per
//! pass, each with an RFC 3339 UTC timestamp, appended.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::SystemTime;

use crate::error::{Error, Result};
use crate::plan::Op;

/// Appends to the log file, if there is one. Write errors are reported once and then ignored:
/// a full log disk must not stop the replica from being kept current.
#[derive(Default)]
pub struct OpLog {
    file: Option<File>,
    failed: bool,
    /// Problems reported in this pass, and in the one before: a problem that the previous pass
    /// reported too is not said again (a `watch` retrying the same failure every second).
    said: HashSet<String>,
    said_before: HashSet<String>,
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
            said: HashSet::new(),
            said_before: HashSet::new(),
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

    pub fn op(&mut self, op: &Op) {
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

    /// Starts a pass: what the last one reported becomes what is not said again.
    pub fn new_pass(&mut self) {
        self.said_before = std::mem::take(&mut self.said);
    }

    /// Reports a problem on stderr and in the log file, unless the previous pass did.
    pub fn problem(&mut self, msg: &str) {
        if self.is_new(msg) {
            log::error!("{msg}");
            self.error(msg);
        }
    }

    /// [`OpLog::problem`] for one the caller says on stderr itself: the log file only.
    pub fn logged_problem(&mut self, msg: &str) {
        if self.is_new(msg) {
            self.error(msg);
        }
    }

    fn is_new(&mut self, msg: &str) -> bool {
        self.said.insert(msg.to_string());
        !self.said_before.contains(msg)
    }

    pub fn error(&mut self, msg: &str) {
        self.line(&format!("error {msg}"));
    }

    /// A line for something done outside a plan (`verify --repair`).
    pub fn note(&mut self, text: &str) {
        self.line(text);
    }

    pub fn summary(&mut self, text: &str) {
        self.line(text);
    }
}
