//! Command-line definitions (clap) and their translation into a validated [`Config`].

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use dirsync::config::{self, Config};
use dirsync::error::Result;
use dirsync::watch::{MAX_INTERVAL, MIN_INTERVAL};

/// Keep a replica directory an exact, up-to-date copy of a source directory.
///
/// dirsync scans both trees, compares them by content hash and applies the difference: new
/// and changed files are copied, removed ones deleted, and files or whole directories that
/// moved in the source are moved in the replica instead of being copied again. An index of
/// both trees (outside both) makes a sync of an unchanged tree cost one stat per file.
#[derive(Parser, Debug)]
#[command(name = "dirsync", version, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Make DST an exact mirror of SRC once, then exit.
    Sync {
        #[command(flatten)]
        common: Common,
        /// Print what would be done (as `status` does) and change nothing.
        #[arg(long, short = 'n')]
        dry_run: bool,
        /// Sync even when SRC is empty and the replica is not (which deletes everything in it).
        #[arg(long)]
        allow_empty_source: bool,
        /// Refuse to run a sync that would delete more than N entries from the replica.
        #[arg(long, value_name = "N")]
        max_delete: Option<usize>,
        /// Discard the index and rebuild it from the two trees (hashes every file once).
        #[arg(long)]
        reindex: bool,
        /// Print the result as one JSON object on stdout (see docs/CLI.md); with --dry-run,
        /// the plan as `status --json` prints it.
        #[arg(long)]
        json: bool,
    },
    /// Print what `sync` would do, one line per change, without writing anything.
    ///
    /// Lines: `A path` new, `M path` content changed, `D path` deleted, `R old -> new` moved,
    /// `C from -> new` copied inside the replica, `T path` type changed, `m path` metadata only.
    Status {
        #[command(flatten)]
        common: Common,
        /// Print one JSON document instead of lines.
        #[arg(long)]
        json: bool,
    },
    /// Sync, wait, and sync again, until Ctrl-C or SIGTERM.
    Watch {
        #[command(flatten)]
        common: Common,
        /// Time between the starts of two passes, e.g. 500ms, 2s, 1m.
        #[arg(long, default_value = "1s", value_parser = interval)]
        interval: Duration,
        /// Sync even when SRC is empty and the replica is not.
        #[arg(long)]
        allow_empty_source: bool,
        /// Refuse a pass that would delete more than N entries from the replica.
        #[arg(long, value_name = "N")]
        max_delete: Option<usize>,
        /// Print one JSON object per reported pass on stdout, one per line (see docs/CLI.md).
        #[arg(long)]
        json: bool,
    },
    /// Re-read every replica file and check it against the hash recorded when it was written
    /// (bit rot, edits that kept size and mtime), and look for every recorded file. Exit code 3
    /// if any differs (or, with --repair, could not be repaired).
    ///
    /// Lines: `corrupt path`, `missing path`; with --repair `repaired path`, `restored path`;
    /// with --repair --dry-run `would repair path`, `would restore path`, `cannot repair path:
    /// why`. DST must exist and have an index: verify creates nothing.
    Verify {
        #[command(flatten)]
        common: Common,
        /// Rewrite the files that differ from SRC, where SRC still has the content they were
        /// written with, and nothing else (no sync: other pending changes stay pending).
        #[arg(long)]
        repair: bool,
        /// With --repair: print what it would rewrite and change nothing.
        #[arg(long, short = 'n', requires = "repair")]
        dry_run: bool,
        /// Print one JSON document on stdout instead of lines (see docs/CLI.md).
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args, Debug)]
pub struct Common {
    /// The directory to mirror.
    pub src: PathBuf,
    /// The replica; created if missing. Files already there are reused where their content
    /// matches, and everything else in it is replaced or removed.
    pub dst: PathBuf,
    /// Append every applied operation, with a timestamp, and a summary per pass to this file.
    #[arg(long, value_name = "PATH")]
    pub log_file: Option<PathBuf>,
    /// Where the index lives [default: $XDG_STATE_HOME/dirsync/, else ~/.local/state/dirsync/,
    /// one file per replica].
    #[arg(long, value_name = "PATH")]
    pub index: Option<PathBuf>,
    /// Print each applied operation (-vv: debug output).
    #[arg(short, long, action = clap::ArgAction::Count, conflicts_with = "quiet")]
    pub verbose: u8,
    /// Print nothing but errors.
    #[arg(short, long)]
    pub quiet: bool,
}

impl Command {
    pub fn common(&self) -> &Common {
        match self {
            Command::Sync { common, .. }
            | Command::Status { common, .. }
            | Command::Watch { common, .. }
            | Command::Verify { common, .. } => common,
        }
    }
}

/// Parses `--interval`: a duration of at least [`MIN_INTERVAL`], so that a watch never spins.
fn interval(text: &str) -> std::result::Result<Duration, String> {
    let d = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if d < MIN_INTERVAL {
        return Err(format!(
            "interval {text} is too short; use at least {} (e.g. 500ms, 2s)",
            humantime::format_duration(MIN_INTERVAL)
        ));
    }
    if d > MAX_INTERVAL {
        return Err(format!(
            "interval {text} is too long; use at most {} (a periodic job is better run by cron \
             or a systemd timer with `dirsync sync`)",
            humantime::format_duration(MAX_INTERVAL)
        ));
    }
    Ok(d)
}

/// Validates the arguments into a [`Config`]; nothing is written here.
pub fn config(cmd: &Command) -> Result<Config> {
    let c = cmd.common();
    let roots = config::resolve_roots(&c.src, &c.dst)?;
    let index = match &c.index {
        Some(p) => p.clone(),
        None => config::default_index(&roots.replica)?,
    };
    let index = config::file_outside(&index, &roots, "index")?;
    let log_file = match &c.log_file {
        Some(p) => Some(config::file_outside(p, &roots, "log file")?),
        None => None,
    };
    let (reindex, allow_empty_source, max_delete, interval) = match cmd {
        Command::Sync {
            reindex,
            allow_empty_source,
            max_delete,
            ..
        } => (*reindex, *allow_empty_source, *max_delete, Duration::ZERO),
        Command::Watch {
            interval,
            allow_empty_source,
            max_delete,
            ..
        } => (false, *allow_empty_source, *max_delete, *interval),
        Command::Status { .. } | Command::Verify { .. } => (false, false, None, Duration::ZERO),
    };
    Ok(Config {
        roots,
        index,
        log_file,
        reindex,
        allow_empty_source,
        max_delete,
        owners: rustix::process::geteuid().is_root(),
        interval,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn intervals_below_the_minimum_are_refused() {
        for short in ["0", "1ns", "99ms"] {
            let e = interval(short).unwrap_err();
            assert!(
                e.contains("too short") && e.contains("at least 100ms"),
                "{e}"
            );
        }
        assert_eq!(interval("100ms"), Ok(MIN_INTERVAL));
        assert_eq!(interval("7days"), Ok(MAX_INTERVAL));
        assert!(interval("8days").is_err());
        assert!(interval("300000000000y").is_err());
        assert!(interval("soon").is_err());
    }
}
