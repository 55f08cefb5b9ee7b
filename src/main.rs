//! The `dirsync` binary: parses arguments, sets up logging and signals, runs a command, and maps
//! the outcome to an exit code (see [`ExitCode`]).

// Output goes through writes that report failure: `println!`/`eprintln!` panic on a closed
// or full stream, which would end a sync halfway and leave its index needing a repair.
#![cfg_attr(not(test), deny(clippy::print_stdout, clippy::print_stderr))]

mod cli;

use std::io::Write;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use clap::Parser;

use cli::{Cli, Command};
use dirsync::config::Config;
use dirsync::error::Error;
use dirsync::event::{Fanout, Json, Summary, Terminal};
use dirsync::sync::{self, Report, Session};
use dirsync::verify::{Repair, Verified};

/// Process exit codes; README.md documents them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ExitCode {
    /// Done (also when Ctrl-C or SIGTERM stopped a run cleanly).
    Success = 0,
    /// Nothing was done: bad input, a locked or damaged index, a guard rail.
    Fatal = 1,
    // 2 is clap's usage error.
    /// The run finished but some paths failed; each was reported.
    Partial = 3,
}

/// Set by the first SIGINT, SIGTERM or SIGHUP: finish the current operation, record it, stop.
static STOP: AtomicBool = AtomicBool::new(false);

/// The exit status of a second signal, which ends the process at once: 128 + the signal's
/// number, as a shell reports a process killed by it.
const SIGNALS: [(i32, i32); 3] = [
    (signal_hook::consts::SIGINT, 130),
    (signal_hook::consts::SIGTERM, 143),
    (signal_hook::consts::SIGHUP, 129),
];

/// First signal: set [`STOP`]. Second: exit at once, which is safe because every replica write
/// is a temporary file renamed into place and the index commits are atomic. Installed before
/// anything else runs, so that a signal in the first milliseconds also stops cleanly.
fn install_signal_handlers() {
    for (sig, status) in SIGNALS {
        // The shutdown is registered first, so that it sees the flag as it was before this signal.
        let _ = signal_hook::flag::register_conditional_shutdown(sig, status, &STOP);
        let _ = signal_hook::flag::register(sig, &STOP);
    }
}

/// Writes a line to stderr. A closed or full stderr is not an error worth dying for: the run
/// goes on (and its index stays consistent), it just cannot say anything.
macro_rules! say {
    ($($arg:tt)*) => {{
        let _ = writeln!(std::io::stderr().lock(), $($arg)*);
    }};
}

fn main() {
    install_signal_handlers();
    let cli = Cli::parse();
    let common = cli.command.common();
    let level = match (common.quiet, common.verbose) {
        (true, _) => "error",
        (false, 0) => "warn",
        (false, 1) => "info",
        (false, _) => "debug",
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level))
        .format(|buf, record| match record.level() {
            log::Level::Error => writeln!(buf, "dirsync: error: {}", record.args()),
            log::Level::Warn => writeln!(buf, "dirsync: warning: {}", record.args()),
            _ => writeln!(buf, "{}", record.args()),
        })
        .init();
    let code = match run(&cli) {
        Ok(code) => code,
        Err(e) => {
            say!("dirsync: error: {e}");
            ExitCode::Fatal
        }
    };
    std::process::exit(code as i32);
}

fn run(cli: &Cli) -> Result<ExitCode, Error> {
    let cfg = cli::config(&cli.command)?;
    let quiet = cli.command.common().quiet;
    let verbose = cli.command.common().verbose > 0;
    match &cli.command {
        Command::Status { json, .. } => {
            let report = sync::status(&cfg)?;
            print_problems(&report);
            let code = show_plan(&report, *json, quiet);
            // `status` informs; only a sync (or its dry run) is refused.
            if let Some(msg) = &report.refused {
                say!("dirsync: a sync would be refused: {msg}");
            }
            Ok(code)
        }
        Command::Sync {
            dry_run: true,
            json,
            ..
        } => {
            let report = sync::status(&cfg)?;
            print_problems(&report);
            let code = show_plan(&report, *json, quiet);
            // The dry run ends as the real run would: refused by the same guard rail.
            match report.refused {
                Some(msg) => Err(Error::Refused { msg }),
                None => Ok(code),
            }
        }
        Command::Sync { json, .. } => {
            let json = json_sink("sync", *json)?;
            let mut session = Session::open(&cfg)?;
            session.add_sink(Box::new(terminal(&cfg, quiet, verbose)));
            if let Some(j) = &json {
                session.add_sink(Box::new(j.clone()));
            }
            let report = session.sync(&STOP)?;
            Ok(exit_for(&report).or_json_failure(json.as_ref()))
        }
        Command::Verify {
            repair,
            dry_run,
            json,
            ..
        } => {
            let mode = match (*repair, *dry_run) {
                (false, _) => Repair::No,
                (true, true) => Repair::DryRun,
                (true, false) => Repair::Yes,
            };
            let v = dirsync::verify::verify(&cfg, mode, &STOP)?;
            let code = if v.is_good() {
                ExitCode::Success
            } else {
                ExitCode::Partial
            };
            if let Err(e) = print_verified(&v, quiet, json.then_some(code)) {
                if e.kind() != std::io::ErrorKind::BrokenPipe {
                    say!("dirsync: error: cannot write the output: {e}");
                }
                return Ok(ExitCode::Fatal);
            }
            Ok(code)
        }
        Command::Watch { json, .. } => {
            let json = json_sink("watch", *json)?;
            let mut sinks = Fanout::default();
            sinks.push(Box::new(terminal(&cfg, quiet, verbose)));
            if let Some(j) = &json {
                sinks.push(Box::new(j.clone()));
            }
            let troubled = dirsync::watch::watch(&cfg, &STOP, Box::new(sinks))?;
            // The state it leaves: failures of earlier passes that a later one fixed are history.
            let code = if troubled {
                ExitCode::Partial
            } else {
                ExitCode::Success
            };
            Ok(code.or_json_failure(json.as_ref()))
        }
    }
}

fn exit_for(report: &Report) -> ExitCode {
    if report.error_count() > 0 {
        ExitCode::Partial
    } else {
        ExitCode::Success
    }
}

/// The exit status of a pass with this summary, as its JSON object says.
fn pass_exit(s: &Summary) -> i32 {
    match s.errors {
        0 => ExitCode::Success as i32,
        _ => ExitCode::Partial as i32,
    }
}

impl ExitCode {
    /// This code, or `Fatal` when JSON results could not be written (already said).
    fn or_json_failure(self, json: Option<&Arc<Mutex<Json>>>) -> ExitCode {
        let failed = json.and_then(|j| j.lock().expect("not poisoned").failed.take());
        match failed {
            None => self,
            Some(e) => {
                if e.kind() != std::io::ErrorKind::BrokenPipe {
                    say!("dirsync: error: cannot write the output: {e}");
                }
                ExitCode::Fatal
            }
        }
    }
}

/// The JSON sink of `--json` (printing on stdout), if asked for. A closed stdout is refused
/// before anything runs: the results would be lost without an error.
fn json_sink(kind: &'static str, asked: bool) -> Result<Option<Arc<Mutex<Json>>>, Error> {
    if !asked {
        return Ok(None);
    }
    if stdout_was_closed() {
        return Err(Error::BadInput {
            msg: "standard output is closed: --json has nowhere to print; nothing was done".into(),
        });
    }
    let sink = Json::new(kind, pass_exit).printing(Box::new(std::io::stdout()));
    Ok(Some(Arc::new(Mutex::new(sink))))
}

/// The terminal lines of a sync's passes (see [`Terminal`]).
fn terminal(cfg: &Config, quiet: bool, verbose: bool) -> Terminal {
    let footer = format!(
        "{} -> {}",
        cfg.roots.source.display(),
        cfg.roots.replica.display()
    );
    Terminal::new(quiet, verbose, Some(footer))
}

/// Prints the plan on stdout (`status`, `sync --dry-run`) and returns the exit code. Output that
/// cannot be written fails the command: a script must not take a cut list for the whole one.
fn show_plan(report: &Report, json: bool, quiet: bool) -> ExitCode {
    if let Err(e) = print_plan(report, json) {
        // A reader that went away (`dirsync status | head`) knows why; anything else is said.
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            say!("dirsync: error: cannot write the output: {e}");
        }
        return ExitCode::Fatal;
    }
    if report.plan.items.is_empty() && !json && !quiet {
        match report.error_count() {
            0 => say!("up to date"),
            n => say!("up to date, except for {n} paths that could not be read (see above)"),
        }
    }
    exit_for(report)
}

fn print_plan(report: &Report, json: bool) -> std::io::Result<()> {
    if stdout_was_closed() && (json || !report.plan.items.is_empty()) {
        return Err(std::io::Error::other("standard output is closed"));
    }
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(out, "{}", dirsync::report::to_json(report))?;
    } else {
        dirsync::report::write_text(&mut out, &report.plan)?;
    }
    out.flush()
}

/// True when the process started with its stdout closed: the Rust runtime then opens
/// `/dev/null` read-write in its place, which no shell redirection does (`>/dev/null` opens it
/// write-only), so output written there would be lost without an error.
fn stdout_was_closed() -> bool {
    use rustix::fs::{OFlags, fcntl_getfl, fstat, major, minor};
    let fd = std::io::stdout();
    let (Ok(st), Ok(fl)) = (fstat(&fd), fcntl_getfl(&fd)) else {
        return false;
    };
    let is_null = rustix::fs::FileType::from_raw_mode(st.st_mode)
        == rustix::fs::FileType::CharacterDevice
        && (major(st.st_rdev), minor(st.st_rdev)) == (1, 3);
    is_null && (fl & OFlags::RWMODE) == OFlags::RDWR
}

/// Prints what `verify` found, as lines or (with the exit code `json` gives) as one JSON
/// document; `Err` when it could not be written (then the command fails: a script must not
/// take a cut list for the whole one).
fn print_verified(v: &Verified, quiet: bool, json: Option<ExitCode>) -> std::io::Result<()> {
    for e in &v.errors {
        say!("dirsync: error: {e}");
    }
    if stdout_was_closed() && (json.is_some() || !v.differences.is_empty()) {
        return Err(std::io::Error::other("standard output is closed"));
    }
    let mut out = std::io::stdout().lock();
    let mut written = match json {
        Some(code) => writeln!(out, "{}", dirsync::report::verified_json(v, code as i32)),
        None => Ok(()),
    };
    for d in &v.differences {
        if let Some(e) = d.error() {
            say!("dirsync: error: {e}");
        }
        if written.is_ok() && json.is_none() {
            written = writeln!(out, "{}", d.line());
        }
    }
    let written = written.and_then(|_| out.flush());
    if !quiet {
        say!("{}", v.summary());
    }
    written
}

fn print_problems(report: &Report) {
    for p in &report.skipped {
        log::warn!("skipped {p}: special files (FIFOs, sockets, devices) are not replicated");
    }
    for e in &report.scan_errors {
        say!("dirsync: error: {e}");
    }
}
