//! The `dirsync` binary: parses arguments, sets up logging and signals, runs a command, and maps
//! the outcome to an exit code (see [`ExitCode`]).

mod cli;

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use clap::Parser;

use cli::{Cli, Command};
use dirsync::config::Config;
use dirsync::error::Error;
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

static STOP: AtomicBool = AtomicBool::new(false);
static SIGNALS: AtomicUsize = AtomicUsize::new(0);

fn main() {
    let cli = Cli::parse();
    let common = cli.command.common();
    let level = match (common.quiet, common.verbose) {
        (true, _) => "error",
        (false, 0) => "warn",
        (false, 1) => "info",
        (false, _) => "debug",
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level))
        .format_timestamp(None)
        .format_target(false)
        .init();
    // First signal: finish the current operation and stop. Second: exit at once, which is
    // safe because every replica write is a temporary file renamed into place.
    let _ = ctrlc::set_handler(|| {
        if SIGNALS.fetch_add(1, Ordering::SeqCst) > 0 {
            std::process::exit(130);
        }
        STOP.store(true, Ordering::SeqCst);
    });
    let code = match run(&cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("dirsync: error: {e}");
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
            print_plan(&report, *json);
            print_problems(&report);
            Ok(exit_for(&report))
        }
        Command::Sync { dry_run: true, .. } => {
            let report = sync::status(&cfg)?;
            print_plan(&report, false);
            print_problems(&report);
            Ok(exit_for(&report))
        }
        Command::Sync { .. } => {
            let mut session = Session::open(&cfg)?;
            let report = session.sync(&STOP)?;
            finish_pass(&cfg, &report, quiet, verbose);
            Ok(exit_for(&report))
        }
        Command::Verify {
            repair, dry_run, ..
        } => {
            let mode = match (*repair, *dry_run) {
                (false, _) => Repair::No,
                (true, true) => Repair::DryRun,
                (true, false) => Repair::Yes,
            };
            let v = dirsync::verify::verify(&cfg, mode, &STOP)?;
            print_verified(&v, quiet);
            Ok(if v.is_good() {
                ExitCode::Success
            } else {
                ExitCode::Partial
            })
        }
        Command::Watch { .. } => {
            let failed =
                dirsync::watch::watch(&cfg, &STOP, |r| finish_pass(&cfg, r, quiet, verbose))?;
            Ok(if failed > 0 {
                ExitCode::Partial
            } else {
                ExitCode::Success
            })
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

fn print_plan(report: &Report, json: bool) {
    let mut out = std::io::stdout().lock();
    let r = if json {
        writeln!(out, "{}", dirsync::report::to_json(report))
    } else {
        dirsync::report::write_text(&mut out, &report.plan)
    };
    // A closed pipe (`dirsync status | head`) is not an error.
    if let Err(e) = r.and_then(|_| out.flush())
        && e.kind() != std::io::ErrorKind::BrokenPipe
    {
        eprintln!("dirsync: error: cannot write to stdout: {e}");
    }
    if report.plan.items.is_empty() && !json {
        eprintln!("up to date");
    }
}

fn print_verified(v: &Verified, quiet: bool) {
    for e in &v.errors {
        eprintln!("dirsync: error: {e}");
    }
    let mut out = std::io::stdout().lock();
    for d in &v.differences {
        if let Some(e) = d.error() {
            eprintln!("dirsync: error: {e}");
        }
        let _ = writeln!(out, "{}", d.line());
    }
    let _ = out.flush();
    if !quiet {
        eprintln!("{}", v.summary());
    }
}

fn print_problems(report: &Report) {
    for p in &report.skipped {
        log::warn!("skipped {p}: special files (FIFOs, sockets, devices) are not replicated");
    }
    for e in &report.scan_errors {
        eprintln!("dirsync: error: {e}");
    }
}

fn finish_pass(cfg: &Config, report: &Report, quiet: bool, verbose: bool) {
    print_problems(report);
    if verbose {
        let mut err = std::io::stderr().lock();
        let _ = dirsync::report::write_text(&mut err, &report.plan);
    }
    if report.outcome.interrupted {
        eprintln!("dirsync: interrupted; what was done is recorded, run again to finish");
    }
    if !quiet {
        eprintln!("{}", report.summary());
    }
    log::info!(
        "{} -> {}",
        cfg.roots.source.display(),
        cfg.roots.replica.display()
    );
}
