//! The replica conformance suite (`dirsync::replica::conformance`) run against every replica
//! this crate has: `LocalReplica` on a temporary directory, read back through `std::fs`, with
//! and without owners; `MemoryReplica`, read back through its own inspection methods, in each
//! profile (all checks for POSIX, the checks of the read methods for every profile).

use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use dirsync::entry::{Content, Kind, Meta, RelPath, Stamp};
use dirsync::replica::Replica;
use dirsync::replica::conformance::{self, Seen, Subject};
use dirsync::replica::local::LocalReplica;
use dirsync::replica::memory::{MemoryReplica, Profile};

struct Local {
    _dir: tempfile::TempDir,
    root: PathBuf,
    outside: PathBuf,
    replica: LocalReplica,
    owners: bool,
}

impl Local {
    /// A replica that puts new files in place with `O_TMPFILE` or not, linking them in with
    /// `AT_EMPTY_PATH` or through `/proc`.
    fn subject(owners: bool, tmpfile: bool, link_empty_path: bool) -> Box<dyn Subject> {
        let dir = tempfile::tempdir().expect("temporary directory");
        let (root, outside) = (dir.path().join("replica"), dir.path().join("outside"));
        fs::create_dir(&root).unwrap();
        fs::create_dir_all(outside.join("d")).unwrap();
        fs::write(outside.join("f"), b"outside bytes").unwrap();
        let replica = LocalReplica::open(&root, owners).unwrap();
        replica.force_fallbacks(tmpfile, link_empty_path);
        Box::new(Local {
            _dir: dir,
            root,
            outside,
            replica,
            owners,
        })
    }

    fn path(&self, p: &RelPath) -> PathBuf {
        p.to_path(&self.root)
    }
}

fn kind_of(md: &fs::Metadata) -> Kind {
    let t = md.file_type();
    match () {
        _ if t.is_file() => Kind::File,
        _ if t.is_dir() => Kind::Dir,
        _ if t.is_symlink() => Kind::Symlink,
        _ => Kind::Special,
    }
}

/// Every node below `dir` (itself included), with kind, mode, mtime, owner and content.
fn describe(dir: &Path, out: &mut String) {
    let md = fs::symlink_metadata(dir).unwrap();
    let kind = kind_of(&md);
    let data = match kind {
        Kind::File => fs::read(dir).unwrap(),
        Kind::Symlink => fs::read_link(dir).unwrap().as_os_str().as_bytes().to_vec(),
        _ => Vec::new(),
    };
    out.push_str(&format!(
        "{} {kind} {:o} {}.{} {}:{} {:?}\n",
        dir.display(),
        md.mode(),
        md.mtime(),
        md.mtime_nsec(),
        md.uid(),
        md.gid(),
        data
    ));
    if kind == Kind::Dir {
        let mut names: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        names.sort();
        for n in names {
            describe(&n, out);
        }
    }
}

impl Subject for Local {
    fn replica(&self) -> &dyn Replica {
        &self.replica
    }
    fn owners(&self) -> bool {
        self.owners
    }
    fn seen(&self, p: &RelPath) -> Option<Seen> {
        let path = self.path(p);
        let md = fs::symlink_metadata(&path).ok()?;
        let kind = kind_of(&md);
        let data = match kind {
            Kind::File => fs::read(&path).unwrap(),
            Kind::Symlink => fs::read_link(&path)
                .unwrap()
                .as_os_str()
                .as_bytes()
                .to_vec(),
            _ => Vec::new(),
        };
        Some(Seen {
            kind,
            data,
            meta: Meta::of_metadata(&md),
            fp: Stamp::of_metadata(&md),
        })
    }
    fn names(&self, dir: &RelPath) -> Vec<Vec<u8>> {
        let mut v: Vec<Vec<u8>> = fs::read_dir(self.path(dir))
            .unwrap()
            .map(|e| e.unwrap().file_name().as_bytes().to_vec())
            .collect();
        v.sort();
        v
    }
    fn rot(&self, p: &RelPath) {
        let mut f = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(self.path(p))
            .unwrap();
        let len = f.metadata().unwrap().len();
        let mut b = [0u8];
        f.seek(SeekFrom::Start(len / 2)).unwrap();
        std::io::Read::read_exact(&mut f, &mut b).unwrap();
        f.seek(SeekFrom::Start(len / 2)).unwrap();
        f.write_all(&[b[0] ^ 0x80]).unwrap();
    }
    fn outside(&self) -> Vec<u8> {
        self.outside.as_os_str().as_bytes().to_vec()
    }
    fn outside_state(&self) -> String {
        let mut s = String::new();
        describe(&self.outside, &mut s);
        s
    }
    fn identity(&self) -> Option<(u64, u64)> {
        let md = fs::symlink_metadata(&self.root).unwrap();
        Some((md.dev(), md.ino()))
    }
}

/// A memory replica and whether it applies owners.
struct Memory(MemoryReplica, bool);

impl Subject for Memory {
    fn replica(&self) -> &dyn Replica {
        &self.0
    }
    fn owners(&self) -> bool {
        self.1
    }
    fn seen(&self, p: &RelPath) -> Option<Seen> {
        let (_, e) = self.0.tree().into_iter().find(|(q, _)| q == p)?;
        let (kind, data) = match &e.content {
            Content::File { .. } => (Kind::File, self.0.read(p).expect("a file")),
            Content::Dir { .. } => (Kind::Dir, Vec::new()),
            Content::Symlink { target } => (Kind::Symlink, target.clone()),
            Content::Special => (Kind::Special, Vec::new()),
        };
        Some(Seen {
            kind,
            data,
            meta: e.meta,
            fp: e.fp,
        })
    }
    fn names(&self, dir: &RelPath) -> Vec<Vec<u8>> {
        self.0
            .tree()
            .into_iter()
            .filter(|(q, _)| q.parent().as_ref() == Some(dir))
            .map(|(q, _)| q.name().to_vec())
            .collect()
    }
    fn rot(&self, p: &RelPath) {
        self.0.rot(p)
    }
    fn outside(&self) -> Vec<u8> {
        b"/outside/the/memory/replica".to_vec()
    }
    fn outside_state(&self) -> String {
        String::new()
    }
    /// No local tree can show a memory replica.
    fn identity(&self) -> Option<(u64, u64)> {
        None
    }
}

/// The three ways the local replica puts a new file in place.
const MODES: [(bool, bool); 3] = [(true, true), (true, false), (false, false)];

#[test]
fn local_replica_conforms() {
    for (tmpfile, empty_path) in MODES {
        conformance::run(&|| Local::subject(false, tmpfile, empty_path));
    }
}

#[test]
fn local_replica_with_owners_conforms() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipped: only root can set owners");
        return;
    }
    for (tmpfile, empty_path) in MODES {
        conformance::run(&|| Local::subject(true, tmpfile, empty_path));
    }
}

#[test]
fn memory_replica_conforms() {
    conformance::run(&|| Box::new(Memory(MemoryReplica::new(true), true)));
}

#[test]
fn memory_replica_without_owners_conforms() {
    conformance::run(&|| Box::new(Memory(MemoryReplica::new(false), false)));
}

/// The profiles that cannot do all a POSIX directory does run the checks of the read methods,
/// each writing only what its profile holds.
#[test]
fn memory_replica_of_every_profile_passes_the_read_checks() {
    for profile in Profile::ALL {
        conformance::run_reads(&|| {
            Box::new(Memory(MemoryReplica::with_profile(profile, false), false))
        });
    }
}
