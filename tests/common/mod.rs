//! Shared support for the `dirsync` integration tests.
//!
//! The tree walker in this module is deliberately independent of the crate under test: it
//! uses `std::fs` only, never follows symlinks and hashes file contents with BLAKE3, so a bug
//! in dirsync's own scanner cannot hide a bug in its replication.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::fs;
use std::io;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use assert_cmd::assert::Assert;
use filetime::FileTime;
use rustix::process::{Pid, Signal};
use tempfile::TempDir;

// ---------------------------------------------------------------------------------------------
// The independent walker
// ---------------------------------------------------------------------------------------------

/// What kind of directory entry a [`Node`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    /// FIFOs, sockets, device nodes.
    Other,
}

/// One entry of a [`Snapshot`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    pub kind: Kind,
    /// BLAKE3 of the bytes, for regular files.
    pub content: Option<[u8; 32]>,
    /// Raw target bytes, for symlinks.
    pub link: Option<Vec<u8>>,
    /// `st_mode & 0o7777` (not compared for symlinks).
    pub mode: u32,
    pub mtime_ns: i128,
    pub uid: u32,
    pub gid: u32,
    pub ino: u64,
}

/// Relative path bytes ('/'-separated, root excluded) to node.
pub type Snapshot = BTreeMap<Vec<u8>, Node>;

/// Walks `root` without following symlinks; panics on any I/O error.
#[track_caller]
pub fn snapshot(root: &Path) -> Snapshot {
    try_snapshot(root).unwrap_or_else(|e| panic!("cannot snapshot {}: {e}", root.display()))
}

/// Like [`snapshot`], but reports I/O errors (e.g. a file vanishing mid-walk) instead of
/// panicking. Useful while another process is still writing the tree.
pub fn try_snapshot(root: &Path) -> io::Result<Snapshot> {
    if !fs::symlink_metadata(root)?.is_dir() {
        return Err(io::Error::other(format!(
            "{} is not a directory",
            root.display()
        )));
    }
    let mut out = Snapshot::new();
    walk(root, &[], &mut out)?;
    Ok(out)
}

fn walk(dir: &Path, prefix: &[u8], out: &mut Snapshot) -> io::Result<()> {
    let mut entries = fs::read_dir(dir)?.collect::<io::Result<Vec<_>>>()?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let mut rel = prefix.to_vec();
        if !rel.is_empty() {
            rel.push(b'/');
        }
        rel.extend_from_slice(entry.file_name().as_bytes());
        let path = entry.path();
        let node = node_for(&path)?;
        let is_dir = node.kind == Kind::Dir;
        out.insert(rel.clone(), node);
        if is_dir {
            walk(&path, &rel, out)?;
        }
    }
    Ok(())
}

fn node_for(path: &Path) -> io::Result<Node> {
    let md = fs::symlink_metadata(path)?;
    let ft = md.file_type();
    let kind = if ft.is_file() {
        Kind::File
    } else if ft.is_dir() {
        Kind::Dir
    } else if ft.is_symlink() {
        Kind::Symlink
    } else {
        Kind::Other
    };
    let content = match kind {
        Kind::File => Some(hash_file(path)?),
        _ => None,
    };
    let link = match kind {
        Kind::Symlink => Some(fs::read_link(path)?.into_os_string().into_vec()),
        _ => None,
    };
    Ok(Node {
        kind,
        content,
        link,
        mode: md.mode() & 0o7777,
        mtime_ns: i128::from(md.mtime()) * 1_000_000_000 + i128::from(md.mtime_nsec()),
        uid: md.uid(),
        gid: md.gid(),
        ino: md.ino(),
    })
}

fn hash_file(path: &Path) -> io::Result<[u8; 32]> {
    let mut hasher = blake3::Hasher::new();
    hasher.update_reader(fs::File::open(path)?)?;
    Ok(*hasher.finalize().as_bytes())
}

/// Renders path bytes for humans: valid UTF-8 is kept (control characters escaped), other
/// bytes become `\xNN`.
pub fn show(bytes: &[u8]) -> String {
    let mut s = String::new();
    for chunk in bytes.utf8_chunks() {
        s.extend(chunk.valid().chars().flat_map(char::escape_debug));
        for b in chunk.invalid() {
            s.push_str(&format!("\\x{b:02x}"));
        }
    }
    s
}

/// For every non-directory path, the other paths of the snapshot that share its inode.
fn link_peers(snap: &Snapshot) -> BTreeMap<&[u8], Vec<&[u8]>> {
    let mut by_ino: BTreeMap<u64, Vec<&[u8]>> = BTreeMap::new();
    for (path, node) in snap {
        if node.kind != Kind::Dir {
            by_ino.entry(node.ino).or_default().push(path);
        }
    }
    let mut peers = BTreeMap::new();
    for group in by_ino.values() {
        for &path in group {
            let others = group.iter().copied().filter(|&p| p != path).collect();
            peers.insert(path, others);
        }
    }
    peers
}

fn show_list(paths: &[&[u8]]) -> String {
    let names: Vec<String> = paths.iter().map(|p| show(p)).collect();
    format!("[{}]", names.join(", "))
}

/// Everything that differs between one SRC node and the DST node at the same path.
fn node_diff(s: &Node, d: &Node) -> Vec<String> {
    if s.kind != d.kind {
        return vec![format!("kind: SRC {:?}, DST {:?}", s.kind, d.kind)];
    }
    let mut what = Vec::new();
    if s.content != d.content {
        what.push("content differs".to_owned());
    }
    if s.link != d.link {
        let target = |l: &Option<Vec<u8>>| l.as_deref().map(show).unwrap_or_default();
        what.push(format!(
            "symlink target: SRC {:?}, DST {:?}",
            target(&s.link),
            target(&d.link)
        ));
    }
    if s.kind != Kind::Symlink && s.mode != d.mode {
        what.push(format!("mode: SRC {:#o}, DST {:#o}", s.mode, d.mode));
    }
    if s.mtime_ns != d.mtime_ns {
        what.push(format!("mtime_ns: SRC {}, DST {}", s.mtime_ns, d.mtime_ns));
    }
    if s.uid != d.uid {
        what.push(format!("uid: SRC {}, DST {}", s.uid, d.uid));
    }
    if s.gid != d.gid {
        what.push(format!("gid: SRC {}, DST {}", s.gid, d.gid));
    }
    what
}

/// One human-readable line per path where `dst` is not a mirror of `src`; empty when it is.
pub fn mirror_diff(src: &Snapshot, dst: &Snapshot) -> Vec<String> {
    let src_peers = link_peers(src);
    let dst_peers = link_peers(dst);
    let keys: BTreeSet<&Vec<u8>> = src.keys().chain(dst.keys()).collect();
    let mut diffs = Vec::new();
    for key in keys {
        let path = show(key);
        match (src.get(key), dst.get(key)) {
            (Some(s), None) => diffs.push(format!("{path}: missing in DST (SRC has {:?})", s.kind)),
            (None, Some(d)) => diffs.push(format!("{path}: extra in DST ({:?})", d.kind)),
            (Some(s), Some(d)) => {
                let mut what = node_diff(s, d);
                let sp = src_peers.get(key.as_slice());
                let dp = dst_peers.get(key.as_slice());
                if s.kind == d.kind && sp != dp {
                    let none = Vec::new();
                    what.push(format!(
                        "hard links: SRC shares its inode with {}, DST with {}",
                        show_list(sp.unwrap_or(&none)),
                        show_list(dp.unwrap_or(&none))
                    ));
                }
                if !what.is_empty() {
                    diffs.push(format!("{path}: {}", what.join("; ")));
                }
            }
            (None, None) => unreachable!("key comes from one of the maps"),
        }
    }
    diffs
}

#[track_caller]
fn fail_with(diffs: &[String], headline: &str) {
    if diffs.is_empty() {
        return;
    }
    const SHOWN: usize = 20;
    let mut msg = format!("{headline}: {} difference(s)", diffs.len());
    for d in diffs.iter().take(SHOWN) {
        msg.push_str("\n  ");
        msg.push_str(d);
    }
    if diffs.len() > SHOWN {
        msg.push_str(&format!("\n  ... and {} more", diffs.len() - SHOWN));
    }
    panic!("{msg}");
}

/// Panics with a readable list of differences unless `dst` is an exact mirror of `src`:
/// same paths, kinds, contents, symlink targets, modes, mtimes (ns), owners and hard-link
/// structure. The roots themselves are not compared.
#[track_caller]
pub fn assert_mirror(src: &Path, dst: &Path) {
    let s = snapshot(src);
    let d = snapshot(dst);
    assert_snapshots_mirror(
        &s,
        &d,
        &format!("{} is not a mirror of {}", dst.display(), src.display()),
    );
}

/// [`assert_mirror`] on snapshots taken earlier (or edited, e.g. to drop a skipped FIFO).
#[track_caller]
pub fn assert_snapshots_mirror(src: &Snapshot, dst: &Snapshot, headline: &str) {
    fail_with(&mirror_diff(src, dst), headline);
}

/// Non-panicking mirror check, for polling while another process writes DST.
pub fn is_mirror(src: &Path, dst: &Path) -> bool {
    match (try_snapshot(src), try_snapshot(dst)) {
        (Ok(s), Ok(d)) => mirror_diff(&s, &d).is_empty(),
        _ => false,
    }
}

/// Panics unless the two snapshots are identical, inode numbers included.
#[track_caller]
pub fn assert_unchanged(before: &Snapshot, after: &Snapshot, what: &str) {
    let mut diffs = mirror_diff(before, after);
    for (path, b) in before {
        if let Some(a) = after.get(path)
            && a.kind == b.kind
            && a.ino != b.ino
        {
            diffs.push(format!("{}: inode {} became {}", show(path), b.ino, a.ino));
        }
    }
    fail_with(&diffs, &format!("{what} changed"));
}

/// ctime (ns) of every entry below `root`, to prove that nothing was written at all.
pub fn ctimes(root: &Path) -> BTreeMap<Vec<u8>, i128> {
    snapshot(root)
        .into_keys()
        .map(|rel| {
            let md = fs::symlink_metadata(root.join(bytes_path(&rel))).unwrap();
            let ctime = i128::from(md.ctime()) * 1_000_000_000 + i128::from(md.ctime_nsec());
            (rel, ctime)
        })
        .collect()
}

/// Counts entries below `root`, tolerating a tree that is being modified concurrently.
pub fn count_entries(root: &Path) -> usize {
    let Ok(rd) = fs::read_dir(root) else {
        return 0;
    };
    let mut n = 0;
    for entry in rd.flatten() {
        n += 1;
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            n += count_entries(&entry.path());
        }
    }
    n
}

// ---------------------------------------------------------------------------------------------
// Tree building helpers
// ---------------------------------------------------------------------------------------------

/// A `Path` made of arbitrary bytes.
pub fn bytes_path(bytes: &[u8]) -> &Path {
    Path::new(OsStr::from_bytes(bytes))
}

/// Writes `bytes` to `path`, creating missing parent directories.
#[track_caller]
pub fn write(path: &Path, bytes: impl AsRef<[u8]>) {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent)
            .unwrap_or_else(|e| panic!("create_dir_all {}: {e}", parent.display()));
    }
    fs::write(path, bytes).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

#[track_caller]
pub fn mkdir(path: &Path) {
    fs::create_dir_all(path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
}

#[track_caller]
pub fn symlink(target: impl AsRef<Path>, link: &Path) {
    std::os::unix::fs::symlink(target.as_ref(), link)
        .unwrap_or_else(|e| panic!("symlink {}: {e}", link.display()));
}

/// Sets atime and mtime of `path` (never following a symlink) to `secs`.`nanos`.
#[track_caller]
pub fn set_mtime(path: &Path, secs: i64, nanos: u32) {
    let t = FileTime::from_unix_time(secs, nanos);
    filetime::set_symlink_file_times(path, t, t)
        .unwrap_or_else(|e| panic!("set times {}: {e}", path.display()));
}

#[track_caller]
pub fn set_mode(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
}

#[track_caller]
pub fn ino(path: &Path) -> u64 {
    fs::symlink_metadata(path)
        .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()))
        .ino()
}

#[track_caller]
pub fn ctime_ns(path: &Path) -> i128 {
    let md = fs::symlink_metadata(path).unwrap_or_else(|e| panic!("stat {}: {e}", path.display()));
    i128::from(md.ctime()) * 1_000_000_000 + i128::from(md.ctime_nsec())
}

/// Deterministic pseudo-random bytes (splitmix64), distinct for distinct seeds.
pub fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Builds a deterministic tree of `n_files` files below `root`: nested directories, an empty
/// directory chain, empty files, assorted modes, and nanosecond mtimes on files and
/// directories. Two calls with the same `n_files` produce mirrors of each other.
pub fn make_tree(root: &Path, n_files: usize) {
    const MODES: [u32; 5] = [0o644, 0o600, 0o755, 0o444, 0o640];
    mkdir(root);
    mkdir(&root.join("empty/deeper/deepest"));
    for i in 0..n_files {
        let rel = match i % 4 {
            0 => format!("f{i:04}.dat"),
            1 => format!("d{}/f{i:04}.dat", i % 5),
            _ => format!("d{}/s{}/f{i:04}.dat", i % 5, i % 3),
        };
        let len = if i % 10 == 0 { 0 } else { (i * 977) % 5000 };
        let path = root.join(rel);
        write(&path, bytes(i as u64, len));
        set_mode(&path, MODES[i % MODES.len()]);
        let nanos = (i as u64 * 123_456_789 % 1_000_000_000) as u32;
        set_mtime(&path, 1_500_000_000 + 17 * i as i64, nanos);
    }
    // Directory mtimes last, deepest first, so creating children cannot disturb them.
    let mut dirs: Vec<Vec<u8>> = snapshot(root)
        .into_iter()
        .filter(|(_, n)| n.kind == Kind::Dir)
        .map(|(p, _)| p)
        .collect();
    dirs.sort_by_key(|p| std::cmp::Reverse(p.iter().filter(|&&b| b == b'/').count()));
    for (j, rel) in dirs.iter().enumerate() {
        let path = root.join(bytes_path(rel));
        set_mode(&path, if j % 3 == 0 { 0o750 } else { 0o755 });
        set_mtime(&path, 1_400_000_000 + j as i64, 7 + 1_000 * j as u32);
    }
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes; returns whether it held.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------------------------
// Running the binary
// ---------------------------------------------------------------------------------------------

/// Path of the built `dirsync` binary.
pub fn dirsync_bin() -> PathBuf {
    assert_cmd::cargo::cargo_bin("dirsync")
}

/// The built `dirsync` binary, with `XDG_STATE_HOME` pointing at `state` so that the index
/// never lands in the real `~/.local/state`.
pub fn dirsync(state: &Path) -> assert_cmd::Command {
    let mut cmd = assert_cmd::Command::cargo_bin("dirsync").expect("the dirsync binary is built");
    cmd.env("XDG_STATE_HOME", state)
        .env_remove("RUST_LOG")
        .timeout(Duration::from_secs(120));
    cmd
}

/// Lines of a command's stdout (which must be UTF-8: the contract escapes other bytes).
#[track_caller]
pub fn stdout_lines(assert: &Assert) -> Vec<String> {
    let out = &assert.get_output().stdout;
    String::from_utf8(out.clone())
        .expect("stdout is UTF-8")
        .lines()
        .map(str::to_owned)
        .collect()
}

pub fn stderr_of(assert: &Assert) -> String {
    String::from_utf8_lossy(&assert.get_output().stderr).into_owned()
}

/// A scratch area: `src` (created, empty), `dst` (not created), and a private state
/// directory (`XDG_STATE_HOME`) and `HOME`, all in one temporary directory.
pub struct Fixture {
    _tmp: TempDir,
    pub root: PathBuf,
    pub src: PathBuf,
    pub dst: PathBuf,
    pub state: PathBuf,
    pub home: PathBuf,
}

impl Default for Fixture {
    fn default() -> Self {
        let tmp = tempfile::Builder::new()
            .prefix("dirsync-test-")
            .tempdir()
            .expect("temp dir");
        let root = tmp.path().to_path_buf();
        let fx = Fixture {
            src: root.join("src"),
            dst: root.join("dst"),
            state: root.join(".state"),
            home: root.join(".home"),
            root,
            _tmp: tmp,
        };
        mkdir(&fx.src);
        mkdir(&fx.state);
        mkdir(&fx.home);
        fx
    }
}

/// The uid (and gid) of `nobody`, for tests that drop root.
pub const NOBODY: u32 = 65534;

pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Gives `root` and everything below it (symlinks themselves, not their targets) to `nobody`.
pub fn chown_tree(root: &Path) {
    std::os::unix::fs::lchown(root, Some(NOBODY), Some(NOBODY)).unwrap();
    if fs::symlink_metadata(root).unwrap().is_dir() {
        for e in fs::read_dir(root).unwrap() {
            chown_tree(&e.unwrap().path());
        }
    }
}

/// A library configuration for the trees `root/src` and `root/dst`, with its index in `root`.
pub fn config_at(root: &Path) -> dirsync::config::Config {
    dirsync::config::Config {
        index: root.join("index.redb"),
        roots: dirsync::config::resolve_roots(&root.join("src"), &root.join("dst")).unwrap(),
        log_file: None,
        reindex: false,
        allow_empty_source: false,
        max_delete: None,
        owners: false,
        interval: Duration::ZERO,
    }
}

impl Fixture {
    /// A library configuration for this fixture's trees, with its index in the fixture, for
    /// tests that drive a `Session` directly.
    pub fn config(&self) -> dirsync::config::Config {
        config_at(&self.root)
    }

    /// `dirsync` run as `nobody` through `setpriv`, with this fixture's state dir and `HOME`
    /// (the caller gives the fixture to `nobody` first, e.g. with [`chown_tree`]).
    pub fn nobody_cmd(&self) -> std::process::Command {
        let mut cmd = std::process::Command::new("setpriv");
        cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", "env"])
            .arg(format!("XDG_STATE_HOME={}", self.state.display()))
            .arg(format!("HOME={}", self.home.display()))
            .arg(dirsync_bin());
        cmd
    }

    /// `dirsync` with this fixture's private state dir and `HOME`.
    pub fn cmd(&self) -> assert_cmd::Command {
        let mut cmd = dirsync(&self.state);
        cmd.env("HOME", &self.home);
        cmd
    }

    /// A `std::process::Command` for background runs (watch, kill tests).
    pub fn std_cmd(&self) -> std::process::Command {
        let mut cmd = std::process::Command::new(dirsync_bin());
        cmd.env("XDG_STATE_HOME", &self.state)
            .env("HOME", &self.home)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null());
        cmd
    }

    /// `dirsync SUB SRC DST ARGS...`
    pub fn run(&self, sub: &str, args: &[&str]) -> Assert {
        self.cmd()
            .arg(sub)
            .arg(&self.src)
            .arg(&self.dst)
            .args(args)
            .assert()
    }

    pub fn sync(&self) -> Assert {
        self.run("sync", &[])
    }

    pub fn status(&self) -> Assert {
        self.run("status", &[])
    }

    /// Runs `status`, asserts exit 0, returns its stdout lines.
    #[track_caller]
    pub fn status_lines(&self) -> Vec<String> {
        stdout_lines(&self.status().code(0))
    }

    /// `status` exits 0, prints nothing to stdout and says `up to date` on stderr.
    #[track_caller]
    pub fn assert_up_to_date(&self) {
        let a = self.status().code(0);
        let lines = stdout_lines(&a);
        assert!(
            lines.is_empty(),
            "status after a sync should print nothing, got:\n{}",
            lines.join("\n")
        );
        let err = stderr_of(&a);
        assert!(
            err.contains("up to date"),
            "status with nothing to do should say `up to date` on stderr, got: {err:?}"
        );
    }

    /// Snapshot of the whole scratch area except the state dir and `HOME`.
    pub fn area_snapshot(&self) -> Snapshot {
        snapshot(&self.root)
            .into_iter()
            .filter(|(k, _)| !k.starts_with(b".state") && !k.starts_with(b".home"))
            .collect()
    }

    /// Content hash of every file in the state dir (the index).
    pub fn state_contents(&self) -> BTreeMap<Vec<u8>, [u8; 32]> {
        snapshot(&self.state)
            .into_iter()
            .filter_map(|(k, n)| n.content.map(|c| (k, c)))
            .collect()
    }

    /// Panics if a file that was in the state dir before has changed or vanished.
    #[track_caller]
    pub fn assert_state_unchanged(&self, before: &BTreeMap<Vec<u8>, [u8; 32]>, what: &str) {
        let after = self.state_contents();
        for (path, hash) in before {
            assert_eq!(
                after.get(path),
                Some(hash),
                "{what} changed the index file {}",
                show(path)
            );
        }
    }
}

/// The one JSON object `sync --json` printed on stdout (docs/CLI.md, "Results as data"),
/// checked for its version and kind; panics if stdout is not exactly one such line.
#[track_caller]
pub fn pass_json(assert: &Assert) -> serde_json::Value {
    let lines = stdout_lines(assert);
    assert_eq!(lines.len(), 1, "one JSON line on stdout: {lines:?}");
    let v: serde_json::Value = serde_json::from_str(&lines[0])
        .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {}", lines[0]));
    assert_eq!(
        (&v["version"], &v["kind"]),
        (&1.into(), &"sync".into()),
        "{v}"
    );
    v
}

/// The counts of a pass's JSON object (see [`pass_json`]) as [`Summary`] holds them; `errors`
/// is how many errors it lists.
#[track_caller]
pub fn json_summary(v: &serde_json::Value) -> Summary {
    let n = |k: &str| {
        v["counts"][k]
            .as_u64()
            .unwrap_or_else(|| panic!("no count {k}: {v}"))
    };
    Summary {
        created: n("created"),
        modified: n("modified"),
        type_changed: n("type_changed"),
        deleted: n("deleted"),
        moved: n("moved"),
        copied: n("copied"),
        metadata: n("metadata"),
        errors: v["errors"].as_array().expect("an errors list").len() as u64,
        not_made: v["not_made"].as_u64().expect("not_made"),
    }
}

// ---------------------------------------------------------------------------------------------
// Background processes
// ---------------------------------------------------------------------------------------------

/// A child process that is killed (SIGKILL) and reaped if the test ends while it still runs.
pub struct Background {
    child: Child,
    stderr: PathBuf,
}

impl Background {
    /// Spawns `cmd` with stdout discarded and stderr captured into `stderr_file`.
    pub fn spawn(mut cmd: std::process::Command, stderr_file: &Path) -> Self {
        let err = fs::File::create(stderr_file).expect("stderr capture file");
        let child = cmd
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .expect("spawn dirsync");
        Background {
            child,
            stderr: stderr_file.to_path_buf(),
        }
    }

    pub fn try_status(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }

    /// Sends `sig` if the child has not been reaped yet.
    pub fn signal(&mut self, sig: Signal) {
        if self.try_status().is_none() {
            rustix::process::kill_process(Pid::from_child(&self.child), sig).expect("kill");
        }
    }

    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.try_status() {
                return Some(st);
            }
            if Instant::now() >= deadline {
                return None;
            }
            sleep(Duration::from_millis(10));
        }
    }

    pub fn stderr(&self) -> String {
        fs::read(&self.stderr)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Sets the immutable attribute (`chattr +i`) on a directory for as long as it lives, so that
/// nothing can be created, removed or renamed inside it, even by root.
pub struct Immutable(PathBuf);

impl Immutable {
    /// `None` when the filesystem does not support the attribute.
    pub fn set(dir: &Path) -> Option<Self> {
        let fd = fs::File::open(dir).ok()?;
        let flags = rustix::fs::ioctl_getflags(&fd).ok()?;
        rustix::fs::ioctl_setflags(&fd, flags | rustix::fs::IFlags::IMMUTABLE).ok()?;
        Some(Immutable(dir.to_path_buf()))
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        if let Ok(fd) = fs::File::open(&self.0)
            && let Ok(flags) = rustix::fs::ioctl_getflags(&fd)
        {
            let _ = rustix::fs::ioctl_setflags(&fd, flags - rustix::fs::IFlags::IMMUTABLE);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Output parsing
// ---------------------------------------------------------------------------------------------

/// Counts from the `synced: ...` summary line.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Summary {
    pub created: u64,
    pub modified: u64,
    pub type_changed: u64,
    pub deleted: u64,
    pub moved: u64,
    pub copied: u64,
    pub metadata: u64,
    pub errors: u64,
    /// Planned changes that were not made (`; N of M planned changes not made (why)`).
    pub not_made: u64,
}

/// Parses `synced: 3 created, 1 modified, 0 type changed, 2 deleted, 1 moved, 0 copied,
/// 0 metadata, 12.0 KiB written, 0 errors in 0.01s[; N of M planned changes not made (why)]`
/// out of `text`; panics if no such line is there.
#[track_caller]
pub fn parse_summary(text: &str) -> Summary {
    let line = text
        .lines()
        .find_map(|l| l.trim_start().strip_prefix("synced: "))
        .unwrap_or_else(|| panic!("no `synced: ...` summary line in: {text:?}"));
    let (counts, rest) = line.split_once("; ").unwrap_or((line, ""));
    let parts: Vec<&str> = counts.split(", ").collect();
    assert_eq!(
        parts.len(),
        9,
        "summary has 9 comma-separated parts: {line:?}"
    );
    let count = |part: &str, label: &str| -> u64 {
        let (n, rest) = part
            .split_once(' ')
            .unwrap_or_else(|| panic!("bad summary part {part:?} in {line:?}"));
        assert!(
            rest.starts_with(label),
            "expected `N {label}` in summary, got {part:?} in {line:?}"
        );
        n.parse()
            .unwrap_or_else(|_| panic!("bad count {n:?} in {line:?}"))
    };
    let bytes_part = parts[7];
    assert!(
        bytes_part.ends_with(" written")
            && bytes_part
                .split(' ')
                .next()
                .is_some_and(|n| n.parse::<f64>().is_ok()),
        "expected `<size> written` in summary, got {bytes_part:?}"
    );
    assert!(
        parts[8].contains(" errors in "),
        "expected `N errors in <time>` in summary, got {:?}",
        parts[8]
    );
    let not_made = match rest {
        "" => 0,
        r => {
            assert!(r.contains(" planned changes not made ("), "bad tail {r:?}");
            count(r, "of ")
        }
    };
    Summary {
        created: count(parts[0], "created"),
        modified: count(parts[1], "modified"),
        type_changed: count(parts[2], "type changed"),
        deleted: count(parts[3], "deleted"),
        moved: count(parts[4], "moved"),
        copied: count(parts[5], "copied"),
        metadata: count(parts[6], "metadata"),
        errors: count(parts[8], "errors"),
        not_made,
    }
}

/// Whether `s` looks like an RFC 3339 timestamp: `YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)`.
pub fn is_rfc3339ish(s: &str) -> bool {
    let b = s.as_bytes();
    let digits =
        |r: std::ops::Range<usize>| b.get(r).is_some_and(|d| d.iter().all(u8::is_ascii_digit));
    let at = |i: usize, c: u8| b.get(i) == Some(&c);
    if !(digits(0..4)
        && at(4, b'-')
        && digits(5..7)
        && at(7, b'-')
        && digits(8..10)
        && (at(10, b'T') || at(10, b't'))
        && digits(11..13)
        && at(13, b':')
        && digits(14..16)
        && at(16, b':')
        && digits(17..19))
    {
        return false;
    }
    let mut i = 19;
    if at(i, b'.') {
        i += 1;
        let start = i;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        if i == start {
            return false;
        }
    }
    match b.get(i) {
        Some(b'Z' | b'z') => i + 1 == b.len(),
        Some(b'+' | b'-') => {
            digits(i + 1..i + 3) && at(i + 3, b':') && digits(i + 4..i + 6) && i + 6 == b.len()
        }
        _ => false,
    }
}

/// One line of a `--log-file`.
#[derive(Debug, PartialEq, Eq)]
pub enum LogLine {
    /// `<timestamp> <letter> <rest>`, e.g. `A a/b` or `R x -> y`.
    Op { letter: char, rest: String },
    /// Any other timestamped line: the per-pass summary.
    Summary(String),
}

pub const OP_LETTERS: [char; 7] = ['A', 'M', 'D', 'R', 'C', 'T', 'm'];

/// Parses a log file; panics on a line without a leading RFC 3339 timestamp.
#[track_caller]
pub fn parse_log(text: &str) -> Vec<LogLine> {
    text.lines()
        .map(|line| {
            let (ts, rest) = line
                .split_once(' ')
                .unwrap_or_else(|| panic!("log line without a space: {line:?}"));
            assert!(
                is_rfc3339ish(ts),
                "log line does not start with an RFC 3339 timestamp: {line:?}"
            );
            let mut chars = rest.chars();
            match (chars.next(), chars.next()) {
                (Some(letter), Some(' ')) if OP_LETTERS.contains(&letter) => LogLine::Op {
                    letter,
                    rest: chars.as_str().to_owned(),
                },
                _ => LogLine::Summary(rest.to_owned()),
            }
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Tests of the walker itself: it must be able to fail.
// ---------------------------------------------------------------------------------------------

#[cfg(test)]
mod walker_tests {
    use super::*;

    /// Two identical generated trees, `a` and `b`, in one temp dir.
    fn twin_trees() -> (TempDir, PathBuf, PathBuf) {
        let tmp = TempDir::new().unwrap();
        let a = tmp.path().join("a");
        let b = tmp.path().join("b");
        for root in [&a, &b] {
            make_tree(root, 30);
            symlink("f0000.dat", &root.join("link"));
            set_mtime(&root.join("link"), 1_234_567_890, 42);
            set_mtime(root, 1_000_000_000, 0);
        }
        (tmp, a, b)
    }

    #[test]
    fn identical_trees_are_mirrors() {
        let (_tmp, a, b) = twin_trees();
        assert_mirror(&a, &b);
        assert!(is_mirror(&a, &b));
    }

    #[test]
    fn snapshot_sees_every_kind_and_never_follows_symlinks() {
        let tmp = TempDir::new().unwrap();
        let r = tmp.path();
        write(&r.join("dir/file"), b"x");
        symlink("dir", &r.join("dirlink"));
        symlink("/", &r.join("rootlink"));
        rustix::fs::mkfifoat(
            rustix::fs::CWD,
            r.join("fifo"),
            rustix::fs::Mode::from(0o644),
        )
        .unwrap();
        write(&r.join(bytes_path(b"caf\xe9")), b"");
        let snap = snapshot(r);
        let keys: Vec<&[u8]> = snap.keys().map(Vec::as_slice).collect();
        assert_eq!(
            keys,
            [
                b"caf\xe9".as_slice(),
                b"dir",
                b"dir/file",
                b"dirlink",
                b"fifo",
                b"rootlink"
            ]
        );
        assert_eq!(snap[b"dirlink".as_slice()].kind, Kind::Symlink);
        assert_eq!(
            snap[b"dirlink".as_slice()].link.as_deref(),
            Some(b"dir".as_slice())
        );
        assert_eq!(snap[b"fifo".as_slice()].kind, Kind::Other);
        assert_eq!(
            snap[b"dir/file".as_slice()].content,
            Some(*blake3::hash(b"x").as_bytes())
        );
    }

    #[test]
    #[should_panic(expected = "content differs")]
    fn one_byte_difference_is_caught() {
        let (_tmp, a, b) = twin_trees();
        // Same size, same mtime: only the bytes differ.
        let path = b.join("d1/f0001.dat");
        let mut data = fs::read(&path).unwrap();
        data[100] ^= 1;
        let md = fs::metadata(&path).unwrap();
        fs::write(&path, data).unwrap();
        filetime::set_file_mtime(&path, FileTime::from_last_modification_time(&md)).unwrap();
        assert_mirror(&a, &b);
    }

    #[test]
    #[should_panic(expected = "mode: SRC 0o4755, DST 0o755")]
    fn mode_difference_is_caught() {
        let (_tmp, a, b) = twin_trees();
        set_mode(&a.join("f0004.dat"), 0o4755);
        set_mode(&b.join("f0004.dat"), 0o755);
        assert_mirror(&a, &b);
    }

    #[test]
    #[should_panic(expected = "mtime_ns")]
    fn one_nanosecond_file_mtime_difference_is_caught() {
        let (_tmp, a, b) = twin_trees();
        set_mtime(&a.join("f0004.dat"), 1_600_000_000, 1);
        set_mtime(&b.join("f0004.dat"), 1_600_000_000, 2);
        assert_mirror(&a, &b);
    }

    #[test]
    #[should_panic(expected = "d2/s1: mtime_ns")]
    fn directory_mtime_difference_is_caught() {
        let (_tmp, a, b) = twin_trees();
        set_mtime(&b.join("d2/s1"), 1_600_000_000, 0);
        assert_mirror(&a, &b);
    }

    #[test]
    #[should_panic(expected = "link: mtime_ns")]
    fn symlink_mtime_difference_is_caught() {
        let (_tmp, a, b) = twin_trees();
        set_mtime(&b.join("link"), 1_234_567_890, 43);
        assert_mirror(&a, &b);
    }

    #[test]
    #[should_panic(expected = "symlink target")]
    fn symlink_target_difference_is_caught() {
        let (_tmp, a, b) = twin_trees();
        fs::remove_file(b.join("link")).unwrap();
        symlink("f0001.dat", &b.join("link"));
        set_mtime(&b.join("link"), 1_234_567_890, 42);
        assert_mirror(&a, &b);
    }

    #[test]
    #[should_panic(expected = "extra in DST")]
    fn extra_file_is_caught() {
        let (_tmp, a, b) = twin_trees();
        let empty = b.join("empty");
        let md = fs::metadata(&empty).unwrap();
        write(&empty.join("stray"), b"");
        filetime::set_file_mtime(&empty, FileTime::from_last_modification_time(&md)).unwrap();
        assert_mirror(&a, &b);
    }

    #[test]
    #[should_panic(expected = "missing in DST")]
    fn missing_file_is_caught() {
        let (_tmp, a, b) = twin_trees();
        write(&a.join("empty/only-in-src"), b"");
        let md = fs::metadata(b.join("empty")).unwrap();
        filetime::set_file_mtime(a.join("empty"), FileTime::from_last_modification_time(&md))
            .unwrap();
        assert_mirror(&a, &b);
    }

    #[test]
    #[should_panic(expected = "kind: SRC File, DST Symlink")]
    fn kind_difference_is_caught() {
        let (_tmp, a, b) = twin_trees();
        fs::remove_file(b.join("f0000.dat")).unwrap();
        symlink("elsewhere", &b.join("f0000.dat"));
        assert_mirror(&a, &b);
    }

    #[test]
    #[should_panic(expected = "uid: SRC 0, DST 4242")]
    fn owner_difference_is_caught() {
        let (_tmp, a, b) = twin_trees();
        std::os::unix::fs::lchown(a.join("f0000.dat"), Some(0), None).unwrap();
        std::os::unix::fs::lchown(b.join("f0000.dat"), Some(4242), None).unwrap();
        assert_mirror(&a, &b);
    }

    #[test]
    #[should_panic(expected = "hard links")]
    fn hard_link_structure_difference_is_caught() {
        let (_tmp, a, b) = twin_trees();
        // In `a` the two names share an inode; in `b` they are two equal but separate files.
        fs::hard_link(a.join("f0004.dat"), a.join("twin.dat")).unwrap();
        fs::copy(b.join("f0004.dat"), b.join("twin.dat")).unwrap();
        let md = fs::metadata(a.join("f0004.dat")).unwrap();
        let t = FileTime::from_last_modification_time(&md);
        filetime::set_file_mtime(b.join("twin.dat"), t).unwrap();
        for root in [&a, &b] {
            set_mtime(root, 1_000_000_000, 0);
        }
        assert_mirror(&a, &b);
    }

    #[test]
    fn mirror_diff_lists_at_most_twenty_paths_in_the_panic_message() {
        let (_tmp, a, b) = twin_trees();
        for i in 0..30 {
            write(&a.join(format!("empty/new{i:02}")), b"");
        }
        let err = std::panic::catch_unwind(|| assert_mirror(&a, &b)).unwrap_err();
        let msg = err.downcast_ref::<String>().unwrap();
        assert!(msg.contains("31 difference(s)"), "{msg}");
        assert!(msg.contains("... and 11 more"), "{msg}");
    }

    #[test]
    fn timestamp_and_summary_parsers() {
        assert!(is_rfc3339ish("2026-11-24T10:00:00.123456Z"));
        assert!(is_rfc3339ish("2026-11-24T10:00:00Z"));
        assert!(is_rfc3339ish("2026-11-24T10:00:00.5+01:00"));
        assert!(!is_rfc3339ish("2026-11-24 10:00:00Z"));
        assert!(!is_rfc3339ish("2026-11-24T10:00:00"));
        assert!(!is_rfc3339ish("A"));
        let s = parse_summary(
            "synced: 3 created, 1 modified, 0 type changed, 2 deleted, 1 moved, 0 copied, \
             0 metadata, 12.0 KiB written, 0 errors in 0.01s\n",
        );
        assert_eq!(
            s,
            Summary {
                created: 3,
                modified: 1,
                deleted: 2,
                moved: 1,
                ..Summary::default()
            }
        );
        let s = parse_summary(
            "synced: 3 created, 0 modified, 0 type changed, 0 deleted, 0 moved, 0 copied, \
             0 metadata, 3 B written, 0 errors in 0.01s; 17 of 20 planned changes not made \
             (interrupted)",
        );
        assert_eq!((s.created, s.not_made), (3, 17));
        let log = parse_log("2026-11-24T10:00:00.123456Z A a b\n2026-11-24T10:00:01Z synced: x\n");
        assert_eq!(
            log,
            [
                LogLine::Op {
                    letter: 'A',
                    rest: "a b".into()
                },
                LogLine::Summary("synced: x".into())
            ]
        );
    }
}
