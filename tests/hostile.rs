//! A hostile writer in the source: a local user who can write SRC swaps one of its directories,
//! or the source root itself, for a symlink to an outside directory of same-named files while
//! syncs run. No byte from outside SRC may ever reach the replica: every source read is beneath
//! the held source root, follows no symlink in any component, and opens the node the scan saw.
//!
//! The figures (syncs, swaps, replica files checked, leaked files and bytes) are printed; see
//! them with `--nocapture`. `DIRSYNC_UNDER_TEST=<binary>` runs the command-line tests against
//! another build of `dirsync`, such as one from before a change.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;
use rustix::fs::{CWD, RenameFlags, renameat_with};

/// Files in the swapped directory.
const FILES: usize = 300;
/// Each run stops after this long, or after [`MAX_SYNCS`] syncs.
const BUDGET: Duration = Duration::from_secs(15);
const MAX_SYNCS: u64 = 300;
/// What every outside file holds, and what the replica is searched for.
const MARK: &[u8] = b"SECRET";
const NOBODY: u32 = 65534;

/// One hostile run at a time: each keeps a core busy with its swaps.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

fn binary() -> PathBuf {
    std::env::var_os("DIRSYNC_UNDER_TEST")
        .map(PathBuf::from)
        .unwrap_or_else(dirsync_bin)
}

/// A thread that exchanges two names (`renameat2(RENAME_EXCHANGE)`) in a tight loop until it is
/// finished: at every moment one of them is the directory, the other the symlink.
struct Swapper {
    stop: Arc<AtomicBool>,
    swaps: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl Swapper {
    fn start(a: PathBuf, b: PathBuf) -> Swapper {
        let stop = Arc::new(AtomicBool::new(false));
        let swaps = Arc::new(AtomicU64::new(0));
        let thread = {
            let (stop, swaps) = (stop.clone(), swaps.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    renameat_with(CWD, &a, CWD, &b, RenameFlags::EXCHANGE)
                        .unwrap_or_else(|e| panic!("exchange {}: {e}", a.display()));
                    swaps.fetch_add(1, Ordering::Relaxed);
                }
            })
        };
        Swapper {
            stop,
            swaps,
            thread: Some(thread),
        }
    }

    /// Stops the swaps; returns how many were done.
    fn finish(mut self) -> u64 {
        self.halt();
        self.swaps.load(Ordering::Relaxed)
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().expect("the swapper panicked");
        }
    }
}

impl Drop for Swapper {
    fn drop(&mut self) {
        self.halt();
    }
}

/// What a hostile run did and found.
#[derive(Debug, Default)]
struct Figures {
    syncs: u64,
    /// Exit status of each sync, with how many exited so.
    exits: BTreeMap<i32, u64>,
    swaps: u64,
    /// Regular replica files read after the syncs, over all syncs.
    files_checked: u64,
    /// Replica files holding outside bytes, over all syncs; their bytes.
    leaked_files: u64,
    leaked_bytes: u64,
    first_leak: Option<PathBuf>,
    /// One error line of a sync that met a swapped path.
    sample_error: Option<String>,
}

impl Figures {
    /// Reads every regular file of the replica (never following a symlink) for outside bytes.
    fn check_replica(&mut self, dir: &Path) {
        for e in fs::read_dir(dir).unwrap_or_else(|e| panic!("list {}: {e}", dir.display())) {
            let path = e.unwrap().path();
            let md = fs::symlink_metadata(&path).unwrap();
            if md.is_dir() {
                self.check_replica(&path);
            } else if md.is_file() {
                let bytes = fs::read(&path).unwrap();
                self.files_checked += 1;
                if bytes.windows(MARK.len()).any(|w| w == MARK) {
                    self.leaked_files += 1;
                    self.leaked_bytes += bytes.len() as u64;
                    self.first_leak.get_or_insert(path);
                }
            }
        }
    }

    fn print(&self, what: &str) {
        eprintln!(
            "{what}: {} syncs (exit status: count {:?}), {} swaps, {} replica files checked, \
             {} leaked files, {} leaked bytes{}",
            self.syncs,
            self.exits,
            self.swaps,
            self.files_checked,
            self.leaked_files,
            self.leaked_bytes,
            self.first_leak
                .as_ref()
                .map(|p| format!(" (first: {})", p.display()))
                .unwrap_or_default()
        );
        if let Some(line) = &self.sample_error {
            eprintln!("{what}: a sync said: {line}");
        }
    }

    fn assert_nothing_leaked(&self, what: &str) {
        self.print(what);
        assert!(
            self.syncs > 0 && self.swaps > 0,
            "{what}: the race never ran"
        );
        assert!(
            self.files_checked > 0,
            "{what}: no file ever reached the replica"
        );
        assert_eq!(
            (self.leaked_files, self.leaked_bytes),
            (0, 0),
            "{what}: bytes from outside the source reached the replica"
        );
    }
}

/// `dir/f0` .. `dir/f{FILES-1}`, each holding `text` and its number; mode 600 when `private`.
fn fill(dir: &Path, text: &str, private: bool) {
    mkdir(dir);
    for i in 0..FILES {
        let f = dir.join(format!("f{i}"));
        write(&f, format!("{text}{i}\n"));
        if private {
            fs::set_permissions(&f, fs::Permissions::from_mode(0o600)).unwrap();
        }
    }
}

/// SRC with `pub/` (public files), `keep` and `publink -> <secret>`, and the outside directory
/// `secret/` of same-named private files. Returns the secret directory.
fn directory_swap_fixture(fx: &Fixture) -> PathBuf {
    let secret = fx.root.join("secret");
    fill(&fx.src.join("pub"), "pub", false);
    fill(&secret, "SECRET outside the source, file ", true);
    fs::set_permissions(&secret, fs::Permissions::from_mode(0o700)).unwrap();
    write(&fx.src.join("keep"), "keep\n");
    symlink(&secret, &fx.src.join("publink"));
    secret
}

fn chown_tree(root: &Path) {
    std::os::unix::fs::lchown(root, Some(NOBODY), Some(NOBODY)).unwrap();
    if fs::symlink_metadata(root).unwrap().is_dir() {
        for e in fs::read_dir(root).unwrap() {
            chown_tree(&e.unwrap().path());
        }
    }
}

/// `dirsync sync SRC DST` with the fixture's state dir, as root or as `nobody`.
fn sync_command(fx: &Fixture, as_nobody: bool) -> Command {
    let mut cmd = match as_nobody {
        false => Command::new(binary()),
        true => {
            let mut c = Command::new("setpriv");
            c.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
                .arg(binary());
            c
        }
    };
    cmd.env("XDG_STATE_HOME", &fx.state)
        .env("HOME", &fx.home)
        .env_remove("RUST_LOG")
        .arg("sync")
        .arg(&fx.src)
        .arg(&fx.dst);
    cmd
}

/// Syncs over and over while `SRC/pub` and `SRC/publink` are exchanged, reading the whole
/// replica for outside bytes after each sync.
fn run_directory_swap(as_nobody: bool) -> Figures {
    let fx = Fixture::default();
    let secret = directory_swap_fixture(&fx);
    if as_nobody {
        chown_tree(&fx.root);
        // Only dirsync's own guard stands between `nobody` and the secret.
        let cat = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "cat"])
            .arg(secret.join("f0"))
            .output()
            .expect("setpriv runs");
        assert!(
            cat.status.success() && cat.stdout.starts_with(MARK),
            "nobody cannot read the secret: {cat:?}"
        );
    }
    let mut fig = Figures::default();
    let swapper = Swapper::start(fx.src.join("pub"), fx.src.join("publink"));
    let start = Instant::now();
    while fig.syncs < MAX_SYNCS && start.elapsed() < BUDGET {
        let out = sync_command(&fx, as_nobody).output().expect("dirsync runs");
        let code = out.status.code().unwrap_or(-1);
        fig.syncs += 1;
        *fig.exits.entry(code).or_default() += 1;
        // 3: some paths changed while they were copied, retried on the next sync.
        assert!(
            code == 0 || code == 3,
            "sync {} exited {code}:\n{}",
            fig.syncs,
            String::from_utf8_lossy(&out.stderr)
        );
        if fig.sample_error.is_none() {
            let err = String::from_utf8_lossy(&out.stderr);
            fig.sample_error = err.lines().find(|l| l.contains("error")).map(str::to_owned);
        }
        if fx.dst.is_dir() {
            fig.check_replica(&fx.dst);
        }
    }
    fig.swaps = swapper.finish();
    fig
}

#[test]
fn a_source_directory_swapped_for_a_symlink_during_syncs_leaks_nothing() {
    let _one = serial();
    run_directory_swap(false).assert_nothing_leaked("as root");
}

#[test]
fn a_source_directory_swapped_for_a_symlink_leaks_nothing_to_an_unprivileged_user() {
    if !is_root() {
        eprintln!("skipped: needs root to run dirsync as nobody");
        return;
    }
    let _one = serial();
    run_directory_swap(true).assert_nothing_leaked("as nobody");
}

/// SRC (`pub/` and `keep`) and an outside tree of the same shape whose files all hold
/// [`MARK`], with `srclink -> outside` beside SRC. Returns the link.
fn root_swap_fixture(fx: &Fixture) -> PathBuf {
    let outside = fx.root.join("outside");
    fill(&fx.src.join("pub"), "pub", false);
    write(&fx.src.join("keep"), "keep\n");
    fill(
        &outside.join("pub"),
        "SECRET outside the source, file ",
        true,
    );
    write(&outside.join("keep"), "SECRET keep\n");
    let link = fx.root.join("srclink");
    symlink(&outside, &link);
    link
}

/// Passes from a held source root while the root's path is exchanged with a symlink to an
/// outside tree of the same shape. Each pass rewrites `pub/` (the test removes it from the
/// replica after each pass), so every pass reads the source's files.
#[test]
fn a_source_root_replaced_by_a_symlink_mid_pass_leaks_nothing() {
    let _one = serial();
    let fx = Fixture::default();
    let link = root_swap_fixture(&fx);
    let cfg = fx.config();
    let stop = AtomicBool::new(false);
    let mut session = dirsync::sync::Session::open(&cfg).unwrap();
    let held = dirsync::scan::open_dir(&fx.src).unwrap();
    let mut fig = Figures::default();
    let swapper = Swapper::start(fx.src.clone(), link);
    let start = Instant::now();
    while fig.syncs < MAX_SYNCS && start.elapsed() < BUDGET {
        let report = session.sync_from(held.as_fd(), &stop).unwrap();
        fig.syncs += 1;
        *fig.exits.entry(report.error_count() as i32).or_default() += 1;
        fig.check_replica(&fx.dst);
        let _ = fs::remove_dir_all(fx.dst.join("pub"));
    }
    fig.swaps = swapper.finish();
    fig.assert_nothing_leaked("source root swapped mid-pass (exits: error count)");
    assert_eq!(
        fig.exits.get(&0),
        Some(&fig.syncs),
        "a pass beneath the held root failed"
    );
}

/// The source root is opened by its resolved path at the start of a pass: a symlink put there
/// after the path was resolved is refused, not followed, and nothing is written.
#[test]
fn a_source_root_replaced_by_a_symlink_after_it_was_resolved_is_not_followed() {
    let fx = Fixture::default();
    let link = root_swap_fixture(&fx);
    let cfg = fx.config();
    let stop = AtomicBool::new(false);
    let mut session = dirsync::sync::Session::open(&cfg).unwrap();
    session.sync(&stop).unwrap();
    assert_mirror(&fx.src, &fx.dst);
    let before = snapshot(&fx.dst);
    renameat_with(CWD, &fx.src, CWD, &link, RenameFlags::EXCHANGE).unwrap();
    let err = match session.sync(&stop) {
        Ok(r) => panic!(
            "synced through the symlink: {} operations",
            r.plan.ops.len()
        ),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("replaced by a symlink"), "{err}");
    assert_eq!(before, snapshot(&fx.dst), "the replica was changed");
}
