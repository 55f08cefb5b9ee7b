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
            // `status` informs; only a sync (or its dry run) is refused.
            if let Some(msg) = &report.refused {
                eprintln!("dirsync: a sync would be refused: {msg}");
            }
            Ok(exit_for(&report))
        }
        Command::Sync { dry_run: true, .. } => {
            let report = sync::status(&cfg)?;
            print_plan(&report, false);
            print_problems(&report);
            // The dry run ends as the real run would: refused by the same guard rail.
            match report.refused {
                Some(msg) => Err(Error::Refused { msg }),
                None => Ok(exit_for(&report)),
            }
        }
        Command::Sync { .. } => {
            let mut session = Session::open(&cfg)?;
            let report = session.sync(&STOP)?;
            finish_pass(&cfg, &report, quiet, verbose);
            Ok(exit_for(&report))
        }
        Command::Verify { repair, .. } => {
            let mut session = Session::open(&cfg)?;
            let v = session.verify(*repair, &STOP)?;
            for e in &v.scan_errors {
                eprintln!("dirsync: error: {e}");
            }
            for p in &v.mismatched {
                println!("{} {p}", if *repair { "repaired" } else { "corrupt" });
            }
            if !quiet {
                eprintln!(
                    "verified {} files ({}): {} differ from the index, {} not recorded yet",
                    v.files_checked,
                    sync::human_bytes(v.bytes_checked),
                    v.mismatched.len(),
                    v.unrecorded.len()
                );
            }
            let repaired = v.repair.as_ref().is_some_and(|r| r.error_count() == 0);
            Ok(
                if !v.scan_errors.is_empty() || (!v.mismatched.is_empty() && !repaired) {
                    ExitCode::Partial
                } else {
                    ExitCode::Success
                },
            )
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
