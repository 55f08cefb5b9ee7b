//! What a pass does, as typed events, and the sinks that turn them into output.
//!
//! The engine never prints: a pass sends each [`Event`] to a [`Sink`], and the command layer
//! decides which sinks listen (the terminal lines, the log file, JSON, a progress bar later).
//! Order within one pass: [`Event::Started`], [`Event::Scanned`] now and then and once at the
//! end of the scan, [`Event::Planned`], one [`Event::Applied`] or [`Event::Failed`] per
//! operation run (with [`Event::Fixed`] among them), the [`Event::Skipped`] special files and
//! the [`Event::Problem`]s met while scanning, then [`Event::Summary`]. A pass that does not
//! run, or that a guard rail refuses, sends [`Event::Unsynced`] instead of the rest.
//!
//! Sinks here: [`Terminal`] (the stderr lines), [`Json`] (one object per pass), [`Fanout`]
//! (several sinks as one), `Vec<Recorded>` (keeps owned copies, for tests), [`Discard`]. The log
//! file is [`OpLog`](crate::oplog::OpLog). A sink that says operation failures on its own output
//! does not say one again in the pass after the one that said it ([`Said`]): a `watch` retrying
//! the same failure every second says it once.

use std::collections::HashSet;
use std::io::{self, Write};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::entry::RelPath;
use crate::error::PathError;
use crate::plan::{Op, Plan};

/// One thing a pass did or found.
#[derive(Clone, Copy, Debug)]
pub enum Event<'a> {
    /// A pass begins.
    Started,
    /// Scan progress: entries seen so far on each side. Sent at most about every
    /// [`PROGRESS_INTERVAL`] while the trees are walked, and once with the totals.
    Scanned { source: u64, replica: u64 },
    /// The plan is made: this many operations, reading this many bytes from the source.
    Planned { ops: u64, bytes: u64 },
    /// One operation was carried out, writing `bytes` bytes of file content.
    Applied { op: &'a Op, bytes: u64 },
    /// One operation failed (its path is relative to the replica root; `.` for the index), or
    /// the index could not record what was done. Counted as an error of the pass.
    Failed(&'a PathError),
    /// A problem met and put right in the same pass (a corrupt copy source rewritten from the
    /// source): said, not counted.
    Fixed(&'a PathError),
    /// A path that could not be read while scanning (its full path); left as it was.
    Problem(&'a PathError),
    /// A special file of the source (FIFO, socket, device) that is not replicated.
    Skipped(&'a RelPath),
    /// The pass is over: what it did, and the plan it ran.
    Summary {
        summary: &'a Summary,
        plan: &'a Plan,
    },
    /// No pass ran, or a guard rail refused one before it changed anything: why.
    Unsynced(&'a str),
}

/// The shortest time between two [`Event::Scanned`] of one scan (but the last).
pub const PROGRESS_INTERVAL: Duration = Duration::from_millis(100);

/// Receives the events of passes.
pub trait Sink {
    fn event(&mut self, e: &Event);
}

/// A sink shared with its owner, who reads it after the passes (e.g. [`Json::failed`]).
impl<S: Sink + ?Sized> Sink for Arc<Mutex<S>> {
    fn event(&mut self, e: &Event) {
        self.lock().expect("not poisoned").event(e);
    }
}

impl<S: Sink + ?Sized> Sink for Box<S> {
    fn event(&mut self, e: &Event) {
        (**self).event(e);
    }
}

/// Ignores every event.
#[derive(Debug, Default)]
pub struct Discard;

impl Sink for Discard {
    fn event(&mut self, _: &Event) {}
}

/// Sends each event to every sink it holds, in order.
#[derive(Default)]
pub struct Fanout(pub Vec<Box<dyn Sink + Send>>);

impl Fanout {
    pub fn push(&mut self, sink: Box<dyn Sink + Send>) {
        self.0.push(sink);
    }
}

impl Sink for Fanout {
    fn event(&mut self, e: &Event) {
        for s in &mut self.0 {
            s.event(e);
        }
    }
}

/// Why planned changes were not made (see [`Summary::not_made`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shortfall {
    Interrupted,
    ReplicaFull,
    ReplicaReadOnly,
    IndexFull,
    /// Some operations failed: their errors were reported.
    Errors,
}

impl Shortfall {
    fn says(self) -> &'static str {
        match self {
            Shortfall::Interrupted => "interrupted",
            Shortfall::ReplicaFull => "the replica's filesystem is full",
            Shortfall::ReplicaReadOnly => "the replica's filesystem is read-only",
            Shortfall::IndexFull => "the index's filesystem is full",
            Shortfall::Errors => "see the errors above",
        }
    }
}

/// What one pass did, as counts: changes made (not planned), by kind.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    pub created: u64,
    pub modified: u64,
    pub type_changed: u64,
    pub deleted: u64,
    pub moved: u64,
    pub copied: u64,
    pub metadata: u64,
    /// Bytes of file content read from the source and written to the replica.
    pub bytes_written: u64,
    /// Errors of the pass: paths that could not be read, operations that failed.
    pub errors: u64,
    /// Changes the plan had.
    pub planned: u64,
    /// Planned changes that were not made, and why.
    pub not_made: u64,
    pub shortfall: Option<Shortfall>,
    /// The run was stopped by a signal before its plan was done.
    pub interrupted: bool,
    pub elapsed: Duration,
}

impl Summary {
    /// The one-line summary printed after a sync and logged.
    pub fn line(&self) -> String {
        let mut line = format!(
            "synced: {} created, {} modified, {} type changed, {} deleted, {} moved, {} copied, {} metadata, {} written, {} errors in {:.2}s",
            self.created,
            self.modified,
            self.type_changed,
            self.deleted,
            self.moved,
            self.copied,
            self.metadata,
            human_bytes(self.bytes_written),
            self.errors,
            self.elapsed.as_secs_f64()
        );
        if self.not_made > 0 {
            let why = self.shortfall.unwrap_or(Shortfall::Errors).says();
            line.push_str(&format!(
                "; {} of {} planned changes not made ({why})",
                self.not_made, self.planned
            ));
        }
        line
    }
}

/// A byte count as people read it: `12 B`, `1.5 KiB`, `3.0 GiB`.
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

/// One line per change of `plan`: `A path`, `R old -> new`, ...
pub fn write_plan(out: &mut dyn Write, plan: &Plan) -> io::Result<()> {
    for item in &plan.items {
        match &item.from {
            Some(from) => writeln!(out, "{} {from} -> {}", item.code.letter(), item.path)?,
            None => writeln!(out, "{} {}", item.code.letter(), item.path)?,
        }
    }
    Ok(())
}

/// The messages a sink said in this pass and in the one before: one said in the pass before
/// is not said again.
#[derive(Debug, Default)]
pub struct Said {
    now: HashSet<String>,
    before: HashSet<String>,
}

impl Said {
    /// Starts a pass: what the last one said becomes what is not said again.
    pub fn new_pass(&mut self) {
        self.before = std::mem::take(&mut self.now);
    }

    /// Whether `msg` is to be said (the pass before did not say it); counts it said.
    pub fn is_new(&mut self, msg: &str) -> bool {
        self.now.insert(msg.to_string());
        !self.before.contains(msg)
    }
}

/// The terminal lines of a sync: an operation's failure as it happens (through the `log`
/// crate, as `dirsync: error: ...`), and after the pass the skipped special files, the paths
/// that could not be read, the plan's lines with `verbose`, an interrupted run's note and the
/// summary line (unless `quiet`).
#[derive(Debug, Default)]
pub struct Terminal {
    quiet: bool,
    verbose: bool,
    /// Logged at info level after each summary.
    footer: Option<String>,
    said: Said,
    skipped: Vec<String>,
    problems: Vec<String>,
}

impl Terminal {
    pub fn new(quiet: bool, verbose: bool, footer: Option<String>) -> Terminal {
        Terminal {
            quiet,
            verbose,
            footer,
            ..Terminal::default()
        }
    }

    fn finish(&mut self, summary: &Summary, plan: &Plan) {
        for p in self.skipped.drain(..) {
            log::warn!("skipped {p}: special files (FIFOs, sockets, devices) are not replicated");
        }
        // A closed or full stderr is not worth dying for: the lines are lost, the sync goes on.
        let mut err = io::stderr().lock();
        for msg in self.problems.drain(..) {
            let _ = writeln!(err, "dirsync: error: {msg}");
        }
        if self.verbose {
            let _ = write_plan(&mut err, plan);
        }
        if summary.interrupted {
            let _ = writeln!(
                err,
                "dirsync: interrupted; what was done is recorded, run again to finish"
            );
        }
        if !self.quiet {
            let _ = writeln!(err, "{}", summary.line());
        }
        drop(err);
        if let Some(footer) = &self.footer {
            log::info!("{footer}");
        }
    }
}

impl Sink for Terminal {
    fn event(&mut self, e: &Event) {
        match e {
            Event::Started => {
                self.said.new_pass();
                self.skipped.clear();
                self.problems.clear();
            }
            Event::Failed(err) if self.said.is_new(&err.message) => log::error!("{err}"),
            Event::Fixed(err) => log::warn!("{err}"),
            Event::Problem(err) => self.problems.push(err.message.clone()),
            Event::Skipped(p) => self.skipped.push(p.to_string()),
            Event::Summary { summary, plan } => self.finish(summary, plan),
            _ => {}
        }
    }
}

/// The version of the JSON documents dirsync prints (docs/CLI.md): raised when a field changes
/// meaning or goes away, not when one is added.
pub const JSON_VERSION: u64 = 1;

/// One JSON object per pass (docs/CLI.md, "Results as data"): kept in [`Json::passes`], and
/// with an output, written to it as one line each.
pub struct Json {
    kind: &'static str,
    /// The exit status a pass with this summary gives.
    exit: fn(&Summary) -> i32,
    out: Option<Box<dyn Write + Send>>,
    scan_errors: Vec<serde_json::Value>,
    op_errors: Vec<serde_json::Value>,
    pub passes: Vec<serde_json::Value>,
    /// The first failure to write to the output; later passes are not written.
    pub failed: Option<io::Error>,
}

impl Json {
    /// A sink for passes of the command `kind` (`sync`, `watch`).
    pub fn new(kind: &'static str, exit: fn(&Summary) -> i32) -> Json {
        Json {
            kind,
            exit,
            out: None,
            scan_errors: Vec::new(),
            op_errors: Vec::new(),
            passes: Vec::new(),
            failed: None,
        }
    }

    /// The same, writing each pass's object to `out` as one line.
    pub fn printing(mut self, out: Box<dyn Write + Send>) -> Json {
        self.out = Some(out);
        self
    }

    fn finish(&mut self, s: &Summary) {
        let mut errors = std::mem::take(&mut self.scan_errors);
        errors.append(&mut self.op_errors);
        let v = serde_json::json!({
            "version": JSON_VERSION,
            "kind": self.kind,
            "counts": {
                "created": s.created,
                "modified": s.modified,
                "type_changed": s.type_changed,
                "deleted": s.deleted,
                "moved": s.moved,
                "copied": s.copied,
                "metadata": s.metadata,
            },
            "bytes_written": s.bytes_written,
            "duration_s": s.elapsed.as_secs_f64(),
            "errors": errors,
            "not_made": s.not_made,
            "interrupted": s.interrupted,
            "exit": (self.exit)(s),
        });
        if let (Some(out), None) = (self.out.as_mut(), &self.failed) {
            let written = writeln!(out, "{v}").and_then(|_| out.flush());
            self.failed = written.err();
        }
        self.passes.push(v);
    }
}

/// A per-path error as JSON: `{"path", "kind", "message"}`.
pub fn error_json(e: &PathError) -> serde_json::Value {
    serde_json::json!({
        "path": e.path,
        "kind": e.kind.as_str(),
        "message": e.message,
    })
}

impl Sink for Json {
    fn event(&mut self, e: &Event) {
        match e {
            Event::Started => {
                self.scan_errors.clear();
                self.op_errors.clear();
            }
            Event::Failed(err) => self.op_errors.push(error_json(err)),
            Event::Problem(err) => self.scan_errors.push(error_json(err)),
            Event::Summary { summary, .. } => self.finish(summary),
            _ => {}
        }
    }
}

/// An owned copy of an [`Event`], as `Vec<Recorded>` keeps them (tests). A summary keeps the
/// plan's lines, not the plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Recorded {
    Started,
    Scanned { source: u64, replica: u64 },
    Planned { ops: u64, bytes: u64 },
    Applied { op: Op, bytes: u64 },
    Failed(PathError),
    Fixed(PathError),
    Problem(PathError),
    Skipped(RelPath),
    Summary(Summary),
    Unsynced(String),
}

impl Sink for Vec<Recorded> {
    fn event(&mut self, e: &Event) {
        self.push(match *e {
            Event::Started => Recorded::Started,
            Event::Scanned { source, replica } => Recorded::Scanned { source, replica },
            Event::Planned { ops, bytes } => Recorded::Planned { ops, bytes },
            Event::Applied { op, bytes } => Recorded::Applied {
                op: op.clone(),
                bytes,
            },
            Event::Failed(err) => Recorded::Failed(err.clone()),
            Event::Fixed(err) => Recorded::Fixed(err.clone()),
            Event::Problem(err) => Recorded::Problem(err.clone()),
            Event::Skipped(p) => Recorded::Skipped(p.clone()),
            Event::Summary { summary, .. } => Recorded::Summary(summary.clone()),
            Event::Unsynced(why) => Recorded::Unsynced(why.to_string()),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    #[test]
    fn a_message_said_in_one_pass_is_not_said_in_the_next_but_after_a_quiet_one() {
        let mut said = Said::default();
        assert!(said.is_new("a"));
        said.new_pass();
        assert!(!said.is_new("a"), "again in the next pass");
        said.new_pass();
        said.new_pass();
        assert!(said.is_new("a"), "after a pass without it");
    }

    #[test]
    fn the_summary_line_names_the_bytes_written_and_what_was_not_made() {
        let s = Summary {
            created: 3,
            copied: 1,
            bytes_written: 900_000,
            planned: 20,
            not_made: 17,
            shortfall: Some(Shortfall::Interrupted),
            ..Summary::default()
        };
        assert_eq!(
            s.line(),
            "synced: 3 created, 0 modified, 0 type changed, 0 deleted, 0 moved, 1 copied, \
             0 metadata, 878.9 KiB written, 0 errors in 0.00s; 17 of 20 planned changes not \
             made (interrupted)"
        );
    }

    #[test]
    fn the_json_sink_puts_scan_errors_before_operation_errors_and_starts_over_each_pass() {
        let mut j = Json::new("sync", |s| if s.errors > 0 { 3 } else { 0 });
        let err = |p: &str| PathError::new(p, ErrorKind::NotFound, format!("{p} is gone"));
        let (op, scan) = (err("a"), err("/src/b"));
        let summary = Summary {
            errors: 2,
            ..Summary::default()
        };
        let plan = Plan::default();
        for e in [
            Event::Started,
            Event::Failed(&op),
            Event::Problem(&scan),
            Event::Summary {
                summary: &summary,
                plan: &plan,
            },
            Event::Started,
            Event::Summary {
                summary: &Summary::default(),
                plan: &plan,
            },
        ] {
            j.event(&e);
        }
        let paths: Vec<&str> = j.passes[0]["errors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["path"].as_str().unwrap())
            .collect();
        assert_eq!(paths, ["/src/b", "a"]);
        assert_eq!(j.passes[0]["errors"][0]["kind"], "not_found");
        assert_eq!(
            (&j.passes[0]["exit"], &j.passes[1]["exit"]),
            (&3.into(), &0.into())
        );
        assert_eq!(j.passes[1]["errors"].as_array().unwrap().len(), 0);
    }
}
