//! A replica held in memory, for model tests: a map from path to node behind a mutex, enforcing
//! what a filesystem enforces, so that a plan that would fail on a real directory fails here too.
//!
//! Rules enforced (each violation is an `io::Error` with the errno a Linux filesystem gives):
//! - Every ancestor of a path must exist and be a directory; a symlink in the middle of a path
//!   is never followed (`ELOOP`, as `RESOLVE_NO_SYMLINKS` gives).
//! - `remove` of a directory needs it empty; `remove` with the wrong kind fails as `unlinkat`
//!   does (`EISDIR`, `ENOTDIR`); a missing node is not an error.
//! - `rename` never lands on a directory (stricter than POSIX, which allows an empty one), never
//!   moves a directory below itself, and onto another link of the same inode does nothing
//!   (POSIX).
//! - Writing a file or symlink over a directory fails (`EISDIR`), as the final rename would.
//! - Creating, removing or renaming an entry sets its directory's mtime to the current time, as
//!   a kernel does; every change to a node gives it a new ctime.
//!
//!
//! A memory replica behaves as one kind of backend, its [`Profile`], and enforces what that kind
//! cannot do: an operation it lacks fails with an error of kind `Unsupported` (`EXDEV` for a
//! rename without rename, `EOPNOTSUPP` for a copy, hard link or symlink it cannot make or for
//! the metadata of an implicit directory, `EILSEQ` for a name that is not UTF-8 where names
//! must be), and metadata it does not keep is stored as it would keep it
//! ([`Capabilities::keep_meta`]: times to whole seconds, default modes). A planner that ignored
//! a capability therefore fails, or leaves a change that no sync makes go away.
//!
//! Temporary names are not needed: every write is put in place in one step under the lock.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{self, Read};
use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use rustix::io::Errno;

use super::caps::{Capabilities, Directories, MtimePrecision, Names, Rename, ServerCopy};
use super::{Check, Replica, Written};
use crate::entry::{Content, Entry, Hash, Kind, Meta, RelPath, Stamp, Time};
use crate::hash;
use crate::scan::{self, Tree, Windows};
use crate::source::{self, Source, SourceFile};

/// The device number every node of a memory replica reports.
pub const DEV: u64 = 0x6d656d;

/// What names a memory tree in messages: a problem at `d/f` is `memory:/d/f`.
const NAME: &str = "memory:";

/// One node of the tree. Files are inodes in a separate table so that hard links share them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Node {
    Dir {
        meta: Meta,
        ino: u64,
        ctime: Time,
    },
    File {
        ino: u64,
    },
    Symlink {
        target: Vec<u8>,
        meta: Meta,
        ino: u64,
        ctime: Time,
    },
}

/// A regular file's content and metadata, shared by all its links.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileInode {
    pub data: Vec<u8>,
    pub meta: Meta,
    pub ctime: Time,
    pub nlink: u64,
}

#[derive(Debug)]
struct State {
    nodes: BTreeMap<RelPath, Node>,
    files: HashMap<u64, FileInode>,
    next_ino: u64,
    clock: u64,
    caps: Capabilities,
    /// Which stamps the nodes show.
    profile: Profile,
}

/// The kind of backend a memory replica behaves as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Profile {
    /// A local POSIX filesystem: everything, owners as asked.
    Posix,
    /// An SFTP (version 3) server: atomic rename, no server-side copy, whole-second times, no
    /// owners, no hard links.
    SftpLike,
    /// An object store (S3): no rename, server-side whole-file copy, times kept exactly in
    /// metadata, no modes, owners, symlinks or hard links, implicit directories (kept as
    /// markers, so an empty one survives), UTF-8 names only.
    ObjectStoreLike,
}

impl Profile {
    pub const ALL: [Profile; 3] = [Profile::Posix, Profile::SftpLike, Profile::ObjectStoreLike];

    /// What a replica of this kind declares; `owners` counts for [`Profile::Posix`] only.
    pub fn capabilities(self, owners: bool) -> Capabilities {
        match self {
            Profile::Posix => Capabilities::posix(owners),
            Profile::SftpLike => Capabilities {
                server_copy: ServerCopy::None,
                mtime: MtimePrecision::Seconds,
                owners: false,
                hard_links: false,
                xattrs: false,
                ..Capabilities::posix(false)
            },
            Profile::ObjectStoreLike => Capabilities {
                atomic_replace: true,
                rename: Rename::None,
                server_copy: ServerCopy::WholeFile,
                mtime: MtimePrecision::InMetadata,
                modes: false,
                owners: false,
                symlinks: false,
                hard_links: false,
                directories: Directories::Implicit,
                names: Names::Utf8,
                xattrs: false,
            },
        }
    }
}

/// A replica that lives in memory; see the module documentation for the rules it enforces.
#[derive(Debug)]
pub struct MemoryReplica {
    state: Mutex<State>,
    caps: Capabilities,
    owners: bool,
    uid: u32,
    gid: u32,
}

/// The error a memory replica gives for an operation its profile does not have.
fn unsupported() -> io::Error {
    err(Errno::OPNOTSUPP)
}

fn err(e: Errno) -> io::Error {
    io::Error::from_raw_os_error(e.raw_os_error())
}

impl State {
    /// A new, strictly increasing change time.
    fn tick(&mut self) -> Time {
        self.clock += 1;
        Time {
            sec: 1_000_000_000 + (self.clock / 1_000_000_000) as i64,
            nsec: (self.clock % 1_000_000_000) as u32,
        }
    }

    fn new_ino(&mut self) -> u64 {
        self.next_ino += 1;
        self.next_ino
    }

    /// Every ancestor of `path` exists and is a directory.
    fn check_parent(&self, path: &RelPath) -> io::Result<()> {
        let mut ancestors = Vec::new();
        let mut p = path.parent();
        while let Some(q) = p {
            p = q.parent();
            ancestors.push(q);
        }
        for a in ancestors.iter().rev() {
            match self.nodes.get(a) {
                Some(Node::Dir { .. }) => {}
                Some(Node::Symlink { .. }) => return Err(err(Errno::LOOP)),
                Some(Node::File { .. }) => return Err(err(Errno::NOTDIR)),
                None => return Err(err(Errno::NOENT)),
            }
        }
        Ok(())
    }

    /// The paths whose name another name of their directory equals but for case.
    fn case_clashes(&self) -> Vec<RelPath> {
        let mut by_dir: HashMap<RelPath, Vec<&RelPath>> = HashMap::new();
        for path in self.nodes.keys() {
            if let Some(parent) = path.parent() {
                by_dir.entry(parent).or_default().push(path);
            }
        }
        let mut out = Vec::new();
        for children in by_dir.into_values() {
            let names: Vec<&[u8]> = children.iter().map(|p| p.name()).collect();
            let clash = crate::replica::probe::case_collisions(&names);
            out.extend(clash.into_iter().map(|k| children[k].clone()));
        }
        out
    }

    fn has_children(&self, path: &RelPath) -> bool {
        self.nodes
            .range(path.clone()..)
            .nth(1)
            .is_some_and(|(k, _)| path.is_ancestor_of(k))
    }

    /// Sets the mtime of the directory holding `path` to now, as adding or removing an entry
    /// does (an implicit directory has no time to set).
    fn touch_parent(&mut self, path: &RelPath) {
        let Some(parent) = path.parent() else { return };
        if self.caps.directories == Directories::Implicit {
            return;
        }
        let ctime = self.tick();
        let caps = self.caps;
        if let Some(Node::Dir { meta, ctime: c, .. }) = self.nodes.get_mut(&parent) {
            let now = Meta {
                mtime: Time::now(),
                ..*meta
            };
            meta.mtime = caps.keep_meta(Kind::Dir, now).mtime;
            *c = ctime;
        }
    }

    /// A name the replica cannot hold fails as a filesystem refusing its encoding does.
    fn check_name(&self, path: &RelPath) -> io::Result<()> {
        if self.caps.names == Names::Utf8 && std::str::from_utf8(path.as_bytes()).is_err() {
            return Err(err(Errno::ILSEQ));
        }
        Ok(())
    }

    /// Drops one link of a file node (the path must already be out of `nodes`).
    fn unlink_node(&mut self, node: &Node) {
        if let Node::File { ino } = node {
            let ctime = self.tick();
            if let Some(f) = self.files.get_mut(ino) {
                f.nlink -= 1;
                f.ctime = ctime;
                if f.nlink == 0 {
                    self.files.remove(ino);
                }
            }
        }
    }

    /// Puts a non-directory node at `path`, replacing a file or symlink there.
    fn install(&mut self, path: &RelPath, node: Node) -> io::Result<()> {
        self.check_parent(path)?;
        if path.is_root() {
            return Err(err(Errno::BUSY));
        }
        match (self.nodes.get(path), &node) {
            (Some(Node::Dir { .. }), _) => return Err(err(Errno::ISDIR)),
            (Some(Node::File { ino: a }), Node::File { ino: b }) if a == b => {
                // Another link of the same inode: the rename into place does nothing, and the
                // temporary link goes away again.
                self.unlink_node(&node);
                return Ok(());
            }
            _ => {}
        }
        if let Some(old) = self.nodes.insert(path.clone(), node) {
            self.unlink_node(&old);
        }
        self.touch_parent(path);
        Ok(())
    }

    /// The stamp of `node` as the profile's backend gives it: POSIX (inode, ctime, ns mtime),
    /// whole-second mtime and size (SFTP), or size and an ETag that changes with every change of
    /// the object (object store; here the BLAKE3 of its inode and change counter).
    fn fingerprint(&self, node: &Node) -> Stamp {
        let (size, mtime, ctime, ino) = match node {
            Node::Dir { meta, ino, ctime } => (0, meta.mtime, *ctime, *ino),
            Node::File { ino } => {
                let f = &self.files[ino];
                (f.data.len() as u64, f.meta.mtime, f.ctime, *ino)
            }
            Node::Symlink {
                target,
                meta,
                ino,
                ctime,
            } => (target.len() as u64, meta.mtime, *ctime, *ino),
        };
        match self.profile {
            Profile::Posix => Stamp::Posix {
                size,
                mtime,
                ctime,
                ino,
                dev: DEV,
            },
            Profile::SftpLike => Stamp::Seconds {
                size,
                mtime: mtime.sec,
            },
            Profile::ObjectStoreLike => {
                let mut version = blake3::Hasher::new();
                version.update(&ino.to_le_bytes());
                version.update(&ctime.as_nanos().to_le_bytes());
                Stamp::Object {
                    size,
                    etag: *version.finalize().as_bytes(),
                }
            }
        }
    }
}

impl MemoryReplica {
    /// An empty POSIX replica: only the root directory, mode 0o755. `owners` says whether `uid`
    /// and `gid` of [`Meta`] are applied (as [`super::local::LocalReplica`] does only as root);
    /// otherwise new nodes belong to the current process's user.
    pub fn new(owners: bool) -> MemoryReplica {
        Self::with_profile(Profile::Posix, owners)
    }

    /// An empty replica that behaves as `profile` (`owners` as for [`Self::new`], where the
    /// profile keeps owners at all).
    pub fn with_profile(profile: Profile, owners: bool) -> MemoryReplica {
        let caps = profile.capabilities(owners);
        let uid = rustix::process::geteuid().as_raw();
        let gid = rustix::process::getegid().as_raw();
        let root_meta = Meta {
            mode: 0o755,
            mtime: Time::now(),
            uid,
            gid,
        };
        let mut nodes = BTreeMap::new();
        nodes.insert(
            RelPath::root(),
            Node::Dir {
                meta: caps.keep_meta(Kind::Dir, root_meta),
                ino: 1,
                ctime: Time { sec: 1, nsec: 0 },
            },
        );
        MemoryReplica {
            state: Mutex::new(State {
                nodes,
                files: HashMap::new(),
                next_ino: 1,
                clock: 0,
                caps,
                profile,
            }),
            caps,
            owners: caps.owners,
            uid,
            gid,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while the lock was held leaves a tree that is still consistent enough to look
        // at (every change is made in one step).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The metadata a new node of `kind` gets: the wanted one as the profile keeps it, with the
    /// process's owner unless owners are replicated.
    fn new_meta(&self, kind: Kind, meta: &Meta) -> Meta {
        let meta = if self.owners {
            *meta
        } else {
            Meta {
                uid: self.uid,
                gid: self.gid,
                ..*meta
            }
        };
        self.caps.keep_meta(kind, meta)
    }

    /// The node at `path`, if any.
    pub fn node(&self, path: &RelPath) -> Option<Node> {
        self.lock().nodes.get(path).cloned()
    }

    /// The bytes of the file at `path`, if it is a file.
    pub fn read(&self, path: &RelPath) -> Option<Vec<u8>> {
        let st = self.lock();
        match st.nodes.get(path)? {
            Node::File { ino } => Some(st.files[ino].data.clone()),
            _ => None,
        }
    }

    /// Bit rot, for tests: flips a byte of the file at `path` and leaves its inode as it was
    /// (size, times), as a disk that corrupts data underneath the filesystem does.
    pub fn rot(&self, path: &RelPath) {
        let mut st = self.lock();
        let Some(Node::File { ino }) = st.nodes.get(path).cloned() else {
            panic!("{path} is not a file of the memory replica");
        };
        let f = st.files.get_mut(&ino).expect("a file node has an inode");
        let at = f.data.len() / 2;
        f.data[at] ^= 0x80;
    }

    /// The whole tree as a scan would record it, in canonical order, the root first: every file
    /// with its content hash, every symlink with its target, hard links pointing at the first of
    /// their paths. Directory tree hashes are left unknown (see
    /// [`crate::hash::fill_tree_hashes`]).
    pub fn tree(&self) -> Vec<(RelPath, Entry)> {
        self.listing(true, &HashSet::new())
    }

    /// Every node not at or below a path of `held_back`, as an entry, in canonical order (the
    /// map's): stat only unless `hashed`, when every file gets its content hash.
    fn listing(&self, hashed: bool, held_back: &HashSet<RelPath>) -> Vec<(RelPath, Entry)> {
        let st = self.lock();
        let seen = Time::now();
        let mut leaders: HashMap<u64, RelPath> = HashMap::new();
        let mut out = Vec::with_capacity(st.nodes.len());
        for (path, node) in &st.nodes {
            if held_back
                .iter()
                .any(|b| b == path || b.is_ancestor_of(path))
            {
                continue;
            }
            let fp = st.fingerprint(node);
            let (content, meta, link) = match node {
                Node::Dir { meta, .. } => (Content::Dir { tree: None }, *meta, None),
                Node::File { ino } => {
                    let f = &st.files[ino];
                    let size = f.data.len() as u64;
                    let hash = match hashed {
                        true => Some(*blake3::hash(&f.data).as_bytes()),
                        false => (size == 0).then(hash::empty_hash),
                    };
                    let link = match leaders.get(ino) {
                        Some(leader) => Some(leader.clone()),
                        None => {
                            leaders.insert(*ino, path.clone());
                            None
                        }
                    };
                    (Content::File { size, hash }, f.meta, link)
                }
                Node::Symlink { target, meta, .. } => (
                    Content::Symlink {
                        target: target.clone(),
                    },
                    *meta,
                    None,
                ),
            };
            let entry = Entry {
                content,
                meta,
                fp,
                seen,
                link,
            };
            out.push((path.clone(), entry));
        }
        out
    }

    /// A walk of the map for [`Replica::walk`] and [`Source::walk`]: on the source side,
    /// directories that are `avoid` and names that equal another of their directory but for
    /// case (with `fold_case`) are held back as problems and unknown, as the local walk does.
    fn walk_map(
        &self,
        (avoid, fold_case): (Option<(u64, u64)>, bool),
        sink: &mut dyn FnMut(&Windows, RelPath, Entry),
    ) -> Tree {
        let mut tree = Tree {
            windows: Windows::new(DEV, crate::entry::RACY_WINDOW_FINE_NS),
            ..Tree::default()
        };
        let mut held_back: Vec<(RelPath, io::Error)> = Vec::new();
        {
            let st = self.lock();
            if fold_case {
                held_back.extend(
                    st.case_clashes()
                        .into_iter()
                        .map(|p| (p, scan::case_clash())),
                );
            }
            for (path, node) in &st.nodes {
                if let (Node::Dir { ino, .. }, false) = (node, path.is_root())
                    && avoid == Some((DEV, *ino))
                {
                    held_back.push((path.clone(), scan::replica_inside()));
                }
            }
        }
        held_back.sort_by(|a, b| a.0.cmp(&b.0));
        let skip: HashSet<RelPath> = held_back.iter().map(|(p, _)| p.clone()).collect();
        for (path, e) in self.listing(false, &skip) {
            sink(&tree.windows, path, e);
        }
        for (path, error) in held_back {
            tree.problems.push(scan::Problem {
                path: path.to_path(Path::new(NAME)),
                error,
            });
            tree.unknown.push(path);
        }
        tree
    }

    /// Hashes the file at `path` as it is now, for [`scan::hash_each`]; `None` when it is no
    /// longer a file.
    fn hash_node(&self, path: &RelPath, old: &Entry) -> scan::HashResult {
        let st = self.lock();
        let Some(node @ Node::File { ino }) = st.nodes.get(path) else {
            return Ok(None);
        };
        let f = &st.files[ino];
        let n = f.data.len() as u64;
        let e = Entry {
            content: Content::File {
                size: n,
                hash: Some(*blake3::hash(&f.data).as_bytes()),
            },
            meta: f.meta,
            fp: st.fingerprint(node),
            seen: Time::now(),
            link: old.link.clone(),
        };
        Ok(Some((e, n)))
    }

    /// The bytes and stat of the regular file at `path`, looked up as the local backends open a
    /// file: a symlink or a non-directory on the way is `ELOOP` or `ENOTDIR`.
    fn file_at(&self, path: &RelPath) -> io::Result<(Vec<u8>, Meta, Stamp)> {
        let st = self.lock();
        st.check_parent(path)?;
        match st.nodes.get(path) {
            Some(node @ Node::File { ino }) => {
                let f = &st.files[ino];
                Ok((f.data.clone(), f.meta, st.fingerprint(node)))
            }
            Some(_) => Err(io::Error::other("not a regular file")),
            None => Err(err(Errno::NOENT)),
        }
    }

    /// Reads all of `data`, hashing it, and lets `check` decide.
    fn take(data: &mut dyn Read, check: Check) -> io::Result<(Vec<u8>, Hash, u64)> {
        let mut buf = Vec::new();
        let (h, n) = hash::copy_hashing(data, &mut buf)?;
        check(&h, n)?;
        Ok((buf, h, n))
    }

    /// Puts a new file inode holding `data` at `path`.
    fn put_file(&self, path: &RelPath, data: Vec<u8>, meta: &Meta) -> io::Result<()> {
        let mut st = self.lock();
        st.check_parent(path)?;
        if matches!(st.nodes.get(path), Some(Node::Dir { .. })) {
            return Err(err(Errno::ISDIR));
        }
        let ino = st.new_ino();
        let ctime = st.tick();
        st.files.insert(
            ino,
            FileInode {
                data,
                meta: self.new_meta(Kind::File, meta),
                ctime,
                nlink: 1,
            },
        );
        st.install(path, Node::File { ino })
    }
}

impl Replica for MemoryReplica {
    fn capabilities(&self) -> Capabilities {
        self.caps
    }

    fn rename(&self, from: &RelPath, to: &RelPath) -> io::Result<()> {
        let mut st = self.lock();
        if st.caps.rename == Rename::None {
            return Err(err(Errno::XDEV));
        }
        st.check_name(to)?;
        if from.is_root() || to.is_root() {
            return Err(err(Errno::BUSY));
        }
        st.check_parent(from)?;
        st.check_parent(to)?;
        let node = st
            .nodes
            .get(from)
            .cloned()
            .ok_or_else(|| err(Errno::NOENT))?;
        if from == to {
            return Ok(());
        }
        if from.is_ancestor_of(to) {
            return Err(err(Errno::INVAL));
        }
        match (&node, st.nodes.get(to)) {
            (Node::Dir { .. }, Some(Node::Dir { .. })) => return Err(err(Errno::NOTEMPTY)),
            (_, Some(Node::Dir { .. })) => return Err(err(Errno::ISDIR)),
            (Node::Dir { .. }, Some(_)) => return Err(err(Errno::NOTDIR)),
            (Node::File { ino: a }, Some(Node::File { ino: b })) if a == b => return Ok(()),
            _ => {}
        }
        if let Some(old) = st.nodes.remove(to) {
            st.unlink_node(&old);
        }
        let keys: Vec<RelPath> = st
            .nodes
            .range(from.clone()..)
            .take_while(|(k, _)| *k == from || from.is_ancestor_of(k))
            .map(|(k, _)| k.clone())
            .collect();
        for k in keys {
            let n = st.nodes.remove(&k).expect("key was just listed");
            st.nodes.insert(k.rebase(from, to), n);
        }
        let ctime = st.tick();
        match st.nodes.get_mut(to) {
            Some(Node::Dir { ctime: c, .. } | Node::Symlink { ctime: c, .. }) => *c = ctime,
            Some(Node::File { ino }) => {
                let ino = *ino;
                if let Some(f) = st.files.get_mut(&ino) {
                    f.ctime = ctime;
                }
            }
            None => unreachable!("just inserted"),
        }
        st.touch_parent(from);
        st.touch_parent(to);
        Ok(())
    }

    fn remove(&self, path: &RelPath, kind: Kind) -> io::Result<()> {
        let mut st = self.lock();
        if path.is_root() {
            return Err(err(Errno::BUSY));
        }
        st.check_parent(path)?;
        let Some(node) = st.nodes.get(path).cloned() else {
            return Ok(());
        };
        match (&node, kind == Kind::Dir) {
            (Node::Dir { .. }, false) => return Err(err(Errno::ISDIR)),
            (Node::Dir { .. }, true) if st.has_children(path) => {
                return Err(err(Errno::NOTEMPTY));
            }
            (Node::File { .. } | Node::Symlink { .. }, true) => return Err(err(Errno::NOTDIR)),
            _ => {}
        }
        st.nodes.remove(path);
        st.unlink_node(&node);
        st.touch_parent(path);
        Ok(())
    }

    fn mkdir(&self, path: &RelPath) -> io::Result<()> {
        let mut st = self.lock();
        st.check_name(path)?;
        st.check_parent(path)?;
        match st.nodes.get(path) {
            Some(Node::Dir { .. }) => return Ok(()),
            Some(_) => return Err(io::Error::from(io::ErrorKind::AlreadyExists)),
            None => {}
        }
        let ino = st.new_ino();
        let ctime = st.tick();
        let meta = self.caps.keep_meta(
            Kind::Dir,
            Meta {
                mode: 0o700,
                mtime: Time::now(),
                uid: self.uid,
                gid: self.gid,
            },
        );
        st.nodes
            .insert(path.clone(), Node::Dir { meta, ino, ctime });
        st.touch_parent(path);
        Ok(())
    }

    fn write_file(
        &self,
        path: &RelPath,
        data: &mut dyn Read,
        meta: &Meta,
        check: Check,
    ) -> io::Result<Written> {
        {
            let st = self.lock();
            st.check_name(path)?;
            st.check_parent(path)?;
        }
        let (buf, hash, len) = Self::take(data, check)?;
        self.put_file(path, buf, meta)?;
        let fp = self.stat_node(path)?;
        Ok(Written { hash, len, fp })
    }

    fn copy_file(
        &self,
        from: &RelPath,
        to: &RelPath,
        meta: &Meta,
        check: Check,
    ) -> io::Result<Written> {
        if self.caps.server_copy == ServerCopy::None {
            return Err(unsupported());
        }
        let data = {
            let st = self.lock();
            st.check_name(to)?;
            st.check_parent(from)?;
            st.check_parent(to)?;
            match st.nodes.get(from) {
                Some(Node::File { ino }) => st.files[ino].data.clone(),
                Some(_) => return Err(io::Error::other("copy source is not a regular file")),
                None => return Err(err(Errno::NOENT)),
            }
        };
        // As the local replica reads its copy back: the hash is of the bytes copied.
        let (_, hash, len) = Self::take(&mut &data[..], check)?;
        self.put_file(to, data, meta)?;
        let fp = self.stat_node(to)?;
        Ok(Written { hash, len, fp })
    }

    fn symlink(&self, path: &RelPath, target: &[u8], meta: &Meta) -> io::Result<()> {
        if !self.caps.symlinks {
            return Err(unsupported());
        }
        let mut st = self.lock();
        st.check_name(path)?;
        st.check_parent(path)?;
        if matches!(st.nodes.get(path), Some(Node::Dir { .. })) {
            return Err(err(Errno::ISDIR));
        }
        let ino = st.new_ino();
        let ctime = st.tick();
        let node = Node::Symlink {
            target: target.to_vec(),
            meta: Meta {
                mode: 0o777,
                ..self.new_meta(Kind::Symlink, meta)
            },
            ino,
            ctime,
        };
        st.install(path, node)
    }

    fn hard_link(&self, leader: &RelPath, path: &RelPath) -> io::Result<Stamp> {
        if !self.caps.hard_links {
            return Err(unsupported());
        }
        self.lock().check_name(path)?;
        self.link_node(leader, path)?;
        self.stat_node(path)
    }

    fn set_meta(&self, path: &RelPath, kind: Kind, meta: &Meta) -> io::Result<()> {
        self.set_node_meta(path, kind, meta)
    }

    fn stat(&self, path: &RelPath) -> io::Result<Stamp> {
        self.stat_node(path)
    }

    fn walk(&self, sink: &mut dyn FnMut(&Windows, RelPath, Entry)) -> Tree {
        self.walk_map((None, false), sink)
    }

    fn hash(&self, tree: &mut Tree, which: &[usize]) -> Vec<(RelPath, Entry)> {
        scan::hash_each(Path::new(NAME), tree, which, &|p, e| self.hash_node(p, e))
    }

    fn open(&self, path: &RelPath) -> io::Result<Box<dyn Read + Send + '_>> {
        let (data, _, _) = self.file_at(path)?;
        Ok(Box::new(io::Cursor::new(data)))
    }

    /// No local source can show a tree in memory.
    fn identity(&self) -> Option<(u64, u64)> {
        None
    }
}

/// A memory tree as the source of a pass: the same map, read as a local source is read.
impl Source for MemoryReplica {
    fn walk(
        &self,
        avoid: Option<(u64, u64)>,
        fold_case: bool,
        sink: &mut dyn FnMut(&Windows, RelPath, Entry),
    ) -> Tree {
        self.walk_map((avoid, fold_case), sink)
    }

    fn hash(&self, tree: &mut Tree, which: &[usize]) -> Vec<(RelPath, Entry)> {
        Replica::hash(self, tree, which)
    }

    fn open(
        &self,
        path: &RelPath,
        node: Option<(u64, u64)>,
    ) -> io::Result<Box<dyn SourceFile + '_>> {
        let (data, meta, fp) = self.file_at(path).map_err(|e| {
            match e.raw_os_error().map(Errno::from_raw_os_error) {
                Some(Errno::LOOP | Errno::NOTDIR) => source::changed(),
                _ => source::vanished(),
            }
        })?;
        if node.is_some_and(|n| Some(n) != fp.node()) {
            return Err(source::changed());
        }
        let seen = Time::now();
        Ok(Box::new(MemoryFile {
            data,
            meta,
            fp,
            seen,
        }))
    }

    fn dir_meta(&self, path: &RelPath) -> io::Result<Meta> {
        let st = self.lock();
        st.check_parent(path)?;
        match st.nodes.get(path) {
            Some(Node::Dir { meta, .. }) => Ok(*meta),
            Some(_) => Err(io::Error::other("not a directory in the source")),
            None => Err(err(Errno::NOENT)),
        }
    }
}

/// A file of a memory source opened for copying: its bytes as they were when it was opened,
/// so the read always holds still.
struct MemoryFile {
    data: Vec<u8>,
    meta: Meta,
    fp: Stamp,
    seen: Time,
}

impl SourceFile for MemoryFile {
    fn meta(&self) -> Meta {
        self.meta
    }

    fn fingerprint(&self) -> Stamp {
        self.fp
    }

    fn seen(&self) -> Time {
        self.seen
    }

    fn len(&self) -> u64 {
        self.data.len() as u64
    }

    fn reader(&self) -> Box<dyn Read + Send + '_> {
        Box::new(&self.data[..])
    }

    fn check_unchanged(&self, n: u64) -> io::Result<()> {
        match n == self.len() {
            true => Ok(()),
            false => Err(io::Error::other(source::ChangedWhileCopied)),
        }
    }
}

impl MemoryReplica {
    fn link_node(&self, leader: &RelPath, path: &RelPath) -> io::Result<()> {
        let mut st = self.lock();
        st.check_parent(leader)?;
        st.check_parent(path)?;
        let ino = match st.nodes.get(leader) {
            Some(Node::File { ino }) => *ino,
            Some(_) => return Err(err(Errno::PERM)),
            None => return Err(err(Errno::NOENT)),
        };
        if matches!(st.nodes.get(path), Some(Node::Dir { .. })) {
            return Err(err(Errno::ISDIR));
        }
        let ctime = st.tick();
        let f = st.files.get_mut(&ino).expect("a file node has an inode");
        f.nlink += 1;
        f.ctime = ctime;
        st.install(path, Node::File { ino })
    }

    fn set_node_meta(&self, path: &RelPath, kind: Kind, meta: &Meta) -> io::Result<()> {
        let mut st = self.lock();
        st.check_parent(path)?;
        if kind == Kind::Dir && self.caps.directories == Directories::Implicit {
            return Err(unsupported());
        }
        let ctime = st.tick();
        let owners = self.owners;
        let meta = self.caps.keep_meta(kind, *meta);
        let apply = |m: &mut Meta, chmod: bool| {
            if owners {
                m.uid = meta.uid;
                m.gid = meta.gid;
            }
            if chmod {
                m.mode = meta.mode;
            }
            m.mtime = meta.mtime;
        };
        let ino = match st.nodes.get_mut(path) {
            None => return Err(err(Errno::NOENT)),
            Some(Node::Dir {
                meta: m, ctime: c, ..
            }) if kind == Kind::Dir => {
                apply(m, true);
                *c = ctime;
                return Ok(());
            }
            Some(Node::Symlink {
                meta: m, ctime: c, ..
            }) if kind == Kind::Symlink => {
                apply(m, false);
                *c = ctime;
                return Ok(());
            }
            Some(Node::File { ino }) if kind == Kind::File => *ino,
            Some(other) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("set_meta for a {kind} on {other:?} at {path}"),
                ));
            }
        };
        let f = st.files.get_mut(&ino).expect("a file node has an inode");
        apply(&mut f.meta, true);
        f.ctime = ctime;
        Ok(())
    }

    fn stat_node(&self, path: &RelPath) -> io::Result<Stamp> {
        let st = self.lock();
        st.check_parent(path)?;
        let node = st.nodes.get(path).ok_or_else(|| err(Errno::NOENT))?;
        Ok(st.fingerprint(node))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> RelPath {
        RelPath::from_bytes(s.as_bytes()).unwrap()
    }

    fn meta(mode: u32, sec: i64) -> Meta {
        Meta {
            mode,
            mtime: Time { sec, nsec: 7 },
            uid: 0,
            gid: 0,
        }
    }

    fn write(r: &MemoryReplica, path: &str, data: &[u8]) -> io::Result<(Hash, u64)> {
        r.write_file(
            &p(path),
            &mut &data[..],
            &meta(0o644, 5),
            &mut |_, _| Ok(()),
        )
        .map(|w| (w.hash, w.len))
    }

    fn errno(e: io::Error) -> Option<i32> {
        e.raw_os_error()
    }

    #[test]
    fn enforces_parents_empty_rmdir_and_no_rename_onto_dirs() {
        let r = MemoryReplica::new(true);
        assert_eq!(
            errno(write(&r, "d/f", b"x").unwrap_err()),
            Some(Errno::NOENT.raw_os_error())
        );
        r.mkdir(&p("d")).unwrap();
        r.mkdir(&p("d")).unwrap();
        write(&r, "d/f", b"x").unwrap();
        write(&r, "g", b"y").unwrap();
        assert!(r.mkdir(&p("g")).is_err());
        assert_eq!(
            errno(r.remove(&p("d"), Kind::Dir).unwrap_err()),
            Some(Errno::NOTEMPTY.raw_os_error())
        );
        assert!(r.remove(&p("d"), Kind::File).is_err());
        assert!(r.remove(&p("g"), Kind::Dir).is_err());
        r.remove(&p("missing"), Kind::File).unwrap();
        assert!(r.rename(&p("g"), &p("d")).is_err());
        r.mkdir(&p("e")).unwrap();
        assert!(r.rename(&p("e"), &p("d")).is_err());
        assert!(r.rename(&p("d"), &p("d/f/x")).is_err());
        assert!(r.rename(&p("d"), &p("g")).is_err());
        r.rename(&p("g"), &p("d/f")).unwrap();
        assert_eq!(r.read(&p("d/f")).unwrap(), b"y");
        assert!(r.node(&p("g")).is_none());
        r.rename(&p("d"), &p("e/d")).unwrap();
        assert_eq!(r.read(&p("e/d/f")).unwrap(), b"y");
        r.remove(&p("e/d/f"), Kind::File).unwrap();
        r.remove(&p("e/d"), Kind::Dir).unwrap();
        assert!(write(&r, "e", b"z").is_err(), "a file cannot replace a dir");
    }

    #[test]
    fn never_follows_a_symlink_in_a_path() {
        let r = MemoryReplica::new(true);
        r.mkdir(&p("d")).unwrap();
        r.symlink(&p("l"), b"d", &meta(0, 1)).unwrap();
        assert_eq!(
            errno(write(&r, "l/f", b"x").unwrap_err()),
            Some(Errno::LOOP.raw_os_error())
        );
        assert!(r.stat(&p("l/f")).is_err());
        assert!(r.stat(&p("l")).is_ok());
    }

    #[test]
    fn hard_links_share_content_and_renaming_onto_a_twin_does_nothing() {
        let r = MemoryReplica::new(true);
        write(&r, "a", b"same").unwrap();
        r.hard_link(&p("a"), &p("b")).unwrap();
        r.rename(&p("a"), &p("b")).unwrap();
        assert!(r.node(&p("a")).is_some(), "POSIX: both names stay");
        let t = r.tree();
        assert_eq!(t[2].1.link, Some(p("a")));
        r.set_meta(&p("b"), Kind::File, &meta(0o600, 9)).unwrap();
        assert_eq!(r.tree()[1].1.meta.mode, 0o600);
        assert!(r.set_meta(&p("b"), Kind::Dir, &meta(0o600, 9)).is_err());
    }

    #[test]
    fn entry_changes_bump_the_parent_mtime() {
        let r = MemoryReplica::new(true);
        r.mkdir(&p("d")).unwrap();
        r.set_meta(&p("d"), Kind::Dir, &meta(0o755, 3)).unwrap();
        write(&r, "d/f", b"x").unwrap();
        let t = r.tree();
        assert_ne!(t[1].1.meta.mtime, meta(0, 3).mtime);
    }

    #[test]
    fn each_profile_refuses_what_it_cannot_do_and_keeps_what_it_keeps() {
        let kind = |e: io::Error| crate::error::ErrorKind::of(&e);
        let unsupported = crate::error::ErrorKind::Unsupported;
        let sftp = MemoryReplica::with_profile(Profile::SftpLike, true);
        write(&sftp, "a", b"x").unwrap();
        assert_eq!(sftp.tree()[1].1.meta.mtime, Time { sec: 5, nsec: 0 });
        assert_eq!(sftp.tree()[1].1.meta.mode, 0o644);
        let fine = |_: &Hash, _: u64| Ok(());
        let copy = sftp.copy_file(&p("a"), &p("b"), &meta(0o644, 5), &mut { fine });
        assert_eq!(kind(copy.unwrap_err()), unsupported);
        assert_eq!(
            kind(sftp.hard_link(&p("a"), &p("c")).unwrap_err()),
            unsupported
        );
        sftp.rename(&p("a"), &p("b")).unwrap();
        sftp.symlink(&p("l"), b"b", &meta(0, 1)).unwrap();

        let object = MemoryReplica::with_profile(Profile::ObjectStoreLike, true);
        write(&object, "a", b"x").unwrap();
        let a = object.tree()[1].1.meta;
        assert_eq!((a.mode, a.mtime), (0o644, Time { sec: 5, nsec: 7 }));
        assert_eq!(
            kind(object.rename(&p("a"), &p("b")).unwrap_err()),
            unsupported
        );
        object
            .copy_file(&p("a"), &p("b"), &meta(0o600, 6), &mut { fine })
            .unwrap();
        assert_eq!(object.read(&p("b")).unwrap(), b"x");
        assert_eq!(
            kind(object.symlink(&p("l"), b"a", &meta(0, 1)).unwrap_err()),
            unsupported
        );
        assert_eq!(
            kind(object.hard_link(&p("a"), &p("c")).unwrap_err()),
            unsupported
        );
        let bad = RelPath::from_bytes(b"\xff").unwrap();
        assert_eq!(kind(object.mkdir(&bad).unwrap_err()), unsupported);
        object.mkdir(&p("d")).unwrap();
        write(&object, "d/f", b"y").unwrap();
        let d = object.node(&p("d")).unwrap();
        assert!(matches!(d, Node::Dir { meta, .. } if meta.mtime == Time::default()));
        let set = object.set_meta(&p("d"), Kind::Dir, &meta(0o700, 9));
        assert_eq!(kind(set.unwrap_err()), unsupported);
        object
            .set_meta(&p("b"), Kind::File, &meta(0o600, 9))
            .unwrap();
        assert_eq!(object.tree()[2].1.meta.mode, 0o644, "modes are not kept");
        assert!(!object.capabilities().owners);
        assert_eq!(
            MemoryReplica::new(true).capabilities(),
            Capabilities::posix(true)
        );
    }
}
