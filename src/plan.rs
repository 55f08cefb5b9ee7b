//! Pure: turns the list of changes into an ordered list of operations on the replica, finding
//! moves, whole-directory moves and local copies by content hash.
//!
//! The planner runs in phases (`Planner::run`), each a function:
//! 1. classify the changes: replica nodes released, source nodes needed, metadata-only changes;
//! 2. match whole-directory moves by tree hash;
//! 3. match file moves and copy sources by content hash;
//! 4. emit the operations, one function per step of the order below;
//! 5. name the status items.
//!
//! Operation order, and why it is safe:
//! 1. `Stage`: a move source (file or whole directory) is renamed to a fresh name at the replica
//!    root. Nothing else can then delete or overwrite it, and swaps and cycles need no special
//!    case. A move whose source, destination and their ancestors nothing else in the plan
//!    touches is not staged: step 4 renames it straight from its source (one rename, one index
//!    move).
//! 2. `Remove`: every replica node that does not survive, children before parents (reverse
//!    canonical order), except the late ones of step 5. This also clears the way for type changes
//!    and frees space first.
//! 3. `Mkdir`: new directories, parents before children.
//! 4. `Rename`: staged nodes into their final places (their parents exist now).
//! 5. `Copy`: local copies from replica files that are stable or were just moved in, or, on a
//!    replica without rename, from released files; then (no rename only) the late `Remove`s:
//!    the released files copied from and their released ancestors, children first. Such a file
//!    is a copy source only when the source has nothing at its path and no ancestor of it
//!    becomes a file or symlink, so nothing in steps 2 to 5 needs its place, and nothing after.
//! 6. `Write` and `Symlink`: content from the source.
//! 7. `Link`: hard links to files that are now in place.
//! 8. `SetMeta`: metadata of moved or unchanged-content nodes, then of every directory whose
//!    entries changed, children before parents, so that no later step bumps an mtime.
//!
//! What the replica declares ([`Capabilities`]) shapes the plan: without rename there are no
//! `Stage` and `Rename` operations (a move is a copy from the old path, or a write from the
//! source without server-side copy, and a removal; a directory move is new directories, copies
//! and removals); without server-side copy there are no `Copy` operations; without hard links
//! no `Link` (each link is written as a file of its own); with implicit directories no
//! directory metadata. A source node the replica cannot hold (a symlink, a name that is not
//! UTF-8) is not produced and is reported in [`Plan::unsupported`]; whatever the replica holds
//! at its path goes. Metadata the replica does not keep is not compared: the pass gives the
//! planner source entries as the replica would keep them ([`Capabilities::keep`]).

use std::collections::{HashMap, HashSet, VecDeque};

use crate::diff::Change;
use crate::entry::{Content, Entry, Hash, Kind, RelPath, parent_of};
use crate::error::{ErrorKind, PathError};
use crate::replica::TMP_PREFIX;
use crate::replica::caps::{Capabilities, Directories, Names, Rename, ServerCopy};

/// An entry of the source tree a plan was made from (see [`Plan::entry`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SrcRef(u32);

/// One step of a plan. `src` is the source entry the result must match, referred to rather
/// than copied: an initial sync plans an operation for every source path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    Stage {
        from: RelPath,
        tmp: RelPath,
    },
    Remove {
        path: RelPath,
        kind: Kind,
    },
    Mkdir {
        path: RelPath,
        src: SrcRef,
        code: Code,
    },
    /// `orig` is where the node was before the plan; `tmp` is where it is now: its staging name,
    /// or `orig` itself for a move that is not staged.
    Rename {
        tmp: RelPath,
        orig: RelPath,
        to: RelPath,
        src: SrcRef,
    },
    /// `trusted` is the replica entry of `from` when the plan was made.
    Copy {
        from: RelPath,
        to: RelPath,
        src: SrcRef,
        trusted: Option<Box<Entry>>,
    },
    Write {
        path: RelPath,
        src: SrcRef,
        code: Code,
    },
    Symlink {
        path: RelPath,
        src: SrcRef,
        code: Code,
    },
    Link {
        leader: RelPath,
        path: RelPath,
        src: SrcRef,
        code: Code,
    },
    SetMeta {
        path: RelPath,
        src: SrcRef,
    },
}

impl Op {
    /// The replica path this operation leaves in its final state.
    pub fn target(&self) -> &RelPath {
        match self {
            Op::Stage { tmp, .. } => tmp,
            Op::Remove { path, .. }
            | Op::Mkdir { path, .. }
            | Op::Write { path, .. }
            | Op::Symlink { path, .. }
            | Op::Link { path, .. }
            | Op::SetMeta { path, .. } => path,
            Op::Rename { to, .. } | Op::Copy { to, .. } => to,
        }
    }

    /// The letter an applied operation is logged with: its change's status letter, or `stage`.
    pub fn letter(&self) -> &'static str {
        match self {
            Op::Stage { .. } => "stage",
            Op::Remove { .. } => Code::Delete.letter(),
            Op::Mkdir { code, .. }
            | Op::Write { code, .. }
            | Op::Symlink { code, .. }
            | Op::Link { code, .. } => code.letter(),
            Op::Rename { .. } => Code::Move.letter(),
            Op::Copy { .. } => Code::Copy.letter(),
            Op::SetMeta { .. } => Code::Meta.letter(),
        }
    }
}

/// What `status` shows for one change, with git-like letters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Code {
    Add,
    Modify,
    Delete,
    Move,
    Copy,
    Type,
    Meta,
}

impl Code {
    pub fn letter(self) -> &'static str {
        match self {
            Code::Add => "A",
            Code::Modify => "M",
            Code::Delete => "D",
            Code::Move => "R",
            Code::Copy => "C",
            Code::Type => "T",
            Code::Meta => "m",
        }
    }
}

/// One line of `status`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Item {
    pub code: Code,
    pub path: RelPath,
    pub from: Option<RelPath>,
}

/// A plan: the operations to run, and what they mean for a reader.
#[derive(Clone, Debug, Default)]
pub struct Plan {
    pub ops: Vec<Op>,
    pub items: Vec<Item>,
    /// Bytes that will be read from the source.
    pub bytes_to_copy: u64,
    /// Source paths the replica cannot hold (kind [`ErrorKind::Unsupported`]), skipped; below
    /// a directory skipped for its name, only the directory is reported.
    pub unsupported: Vec<PathError>,
    /// The (kept) source tree the plan was made from, which the operations refer to.
    source: Vec<(RelPath, Entry)>,
}

/// A plan that does not hold the source tree its operations refer to yet: the changes it was
/// made from borrow that tree, so it is handed over once they are gone.
pub struct Draft(Plan);

impl Draft {
    /// Completes the plan with `source`, the tree given to [`plan_with`].
    pub fn with_source(self, source: Vec<(RelPath, Entry)>) -> Plan {
        Plan { source, ..self.0 }
    }
}

impl Plan {
    /// The source entry an operation refers to.
    pub fn entry(&self, r: SrcRef) -> &Entry {
        &self.source[r.0 as usize].1
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    pub fn count(&self, code: Code) -> usize {
        self.items.iter().filter(|i| i.code == code).count()
    }

    pub fn removals(&self) -> usize {
        self.ops
            .iter()
            .filter(|o| matches!(o, Op::Remove { .. }))
            .count()
    }
}

/// Builds the plan for `changes` on a replica that can do what `caps` says. `src` and `dst`
/// are the two trees the changes came from; the plan keeps a copy of `src`.
pub fn plan(
    changes: &[Change],
    src: &[(RelPath, Entry)],
    dst: &[(RelPath, Entry)],
    caps: &Capabilities,
) -> Plan {
    plan_with(changes, src, dst, &[], caps).with_source(src.to_vec())
}

/// [`plan`] from parts of the two trees: `src` and `dst` need to hold only every changed path,
/// its ancestors and the whole subtree of an added or deleted directory, plus the root and any
/// root-level name with [`TMP_PREFIX`]. Replica files that stay unchanged and hold wanted
/// content are `copy_sources`.
pub fn plan_with(
    changes: &[Change],
    src: &[(RelPath, Entry)],
    dst: &[(RelPath, Entry)],
    copy_sources: &[(RelPath, Entry)],
    caps: &Capabilities,
) -> Draft {
    Draft(
        Planner {
            src,
            dst,
            copy_sources,
            caps,
            owners: caps.owners,
            refused: HashSet::new(),
            next_tmp: 0,
        }
        .run(changes),
    )
}

struct Planner<'a> {
    src: &'a [(RelPath, Entry)],
    dst: &'a [(RelPath, Entry)],
    copy_sources: &'a [(RelPath, Entry)],
    caps: &'a Capabilities,
    owners: bool,
    /// Source paths the replica cannot hold: planned as if the source had nothing there.
    refused: HashSet<RelPath>,
    next_tmp: u64,
}

/// The changes sorted by what they ask of the replica (see [`classify`]).
struct Classes<'c> {
    /// Replica nodes that go away: deleted, or replaced by other content or another kind.
    released: Vec<(&'c RelPath, &'c Entry)>,
    /// Source nodes that must be produced, with what `status` calls them.
    needed: Vec<(&'c RelPath, &'c Entry, Code)>,
    /// Nodes that keep their content and take the source's metadata.
    metas: Vec<(&'c RelPath, &'c Entry)>,
    /// Source nodes the replica cannot hold.
    refused: Vec<&'c RelPath>,
}

/// A replica node (a file, or a directory with its subtree) renamed from `from` to `to`, where
/// it must match the source entry `entry`.
struct Move<'c> {
    from: RelPath,
    to: RelPath,
    entry: &'c Entry,
}

/// How the needed paths that are not moved get their content (see [`Planner::match_files`]).
#[derive(Default)]
struct Built<'c> {
    /// `Copy` operations from replica files.
    copies: Vec<Op>,
    /// Files and symlinks written from the source, as (path, entry, code).
    writes: Vec<(&'c RelPath, &'c Entry, Code)>,
    /// `Link` operations to hard-link leaders.
    links: Vec<Op>,
    /// Bytes the writes read from the source.
    bytes: u64,
    /// Released files that copies read from, removed after the copies (no rename only).
    lingering: HashSet<RelPath>,
}

/// Replica files that can give a needed file its content, by hash.
struct Pools<'c> {
    /// Released files, each usable once as a move source; on a replica without rename, those
    /// that may stay until the copies are done, each usable as a copy source any number of times.
    vanishing: HashMap<Hash, VecDeque<&'c RelPath>>,
    /// The vanishing files that copies read from (no rename only).
    lingering: HashSet<RelPath>,
    /// Files that stay where they are (in the kept tree or among the copy sources).
    stable: HashMap<Hash, RelPath>,
    /// Files that are in place once the moves are done, at their new paths.
    moved_in: HashMap<Hash, RelPath>,
}

/// Where a needed path's content comes from.
enum Source {
    Move(RelPath),
    /// From a replica file; with its replica entry when that is still valid at copy time.
    Copy(RelPath, Option<Entry>),
    Fresh,
}

/// Phase 1: sorts the changes into released replica nodes, needed source nodes and
/// metadata-only changes. A modification or type change is both released and needed. A source
/// node the replica cannot hold is reported into `refused` and not needed (what the replica
/// has at its path is released); directory metadata on a replica with implicit directories is
/// not a change.
fn classify<'c>(
    changes: &[Change<'c>],
    caps: &Capabilities,
    refused: &mut Vec<PathError>,
) -> Classes<'c> {
    let mut classes = Classes {
        released: Vec::new(),
        needed: Vec::new(),
        metas: Vec::new(),
        refused: Vec::new(),
    };
    for &c in changes {
        if let Change::Add { path, src }
        | Change::Modify { path, src, .. }
        | Change::Type { path, src, .. }
        | Change::Meta { path, src, .. } = c
            && let Some(why) = caps.refuses(path, src)
        {
            if let Change::Modify { dst, .. }
            | Change::Type { dst, .. }
            | Change::Meta { dst, .. } = c
            {
                classes.released.push((path, dst));
            }
            classes.refused.push(path);
            // Below a directory refused for its name, every name is refused with it.
            let parent_refused = caps.names == Names::Utf8
                && path
                    .parent_bytes()
                    .is_some_and(|b| std::str::from_utf8(b).is_err());
            if !parent_refused {
                refused.push(PathError::new(
                    path,
                    ErrorKind::Unsupported,
                    format!(
                        "{path} is not replicated: {why}; it is skipped on every sync (rename or \
                         remove it in the source, or use a replica that can hold it)"
                    ),
                ));
            }
            continue;
        }
        match c {
            Change::Meta { src, .. }
                if src.is_dir() && caps.directories == Directories::Implicit => {}
            Change::Add { path, src } => classes.needed.push((path, src, Code::Add)),
            Change::Modify { path, src, dst } => {
                classes.released.push((path, dst));
                classes.needed.push((path, src, Code::Modify));
            }
            Change::Type { path, src, dst } => {
                classes.released.push((path, dst));
                classes.needed.push((path, src, Code::Type));
            }
            Change::Delete { path, dst } => classes.released.push((path, dst)),
            Change::Meta { path, src, .. } => classes.metas.push((path, src)),
        }
    }
    classes
}

impl Planner<'_> {
    /// Where `e` sits in the source tree. Changes hand out references into the tree, so every
    /// source entry the planner sees is one of its elements, and its index follows from its
    /// address; the assertion checks that it is.
    fn src_ref(&self, e: &Entry) -> SrcRef {
        let offset = (e as *const Entry as usize).wrapping_sub(self.src.as_ptr() as usize);
        let i = offset / std::mem::size_of::<(RelPath, Entry)>();
        assert!(
            i < self.src.len() && std::ptr::eq(&self.src[i].1, e),
            "an entry to replicate is not from the source tree"
        );
        SrcRef(i as u32)
    }

    fn tmp_name(&mut self) -> RelPath {
        loop {
            let name = format!("{TMP_PREFIX}stage-{}", self.next_tmp);
            self.next_tmp += 1;
            let p = RelPath::root().join(name.as_bytes());
            let taken = |t: &[(RelPath, Entry)]| t.binary_search_by(|(x, _)| x.cmp(&p)).is_ok();
            if !taken(self.src) && !taken(self.dst) {
                return p;
            }
        }
    }

    /// Runs the phases of the module doc in turn.
    fn run<'c>(mut self, changes: &[Change<'c>]) -> Plan {
        let mut unsupported = Vec::new();
        let mut classes = classify(changes, self.caps, &mut unsupported);
        self.refused = classes.refused.iter().map(|p| (*p).clone()).collect();
        // Every replica path that will not be where it is now, for choosing copy sources.
        let gone: HashSet<&RelPath> = classes.released.iter().map(|(p, _)| *p).collect();
        let mut moves = match self.caps.rename {
            Rename::Atomic => self.match_dir_moves(&mut classes),
            Rename::None => Vec::new(),
        };
        let built = self.match_files(&classes, &gone, &mut moves);

        // An upper bound on the operations below (stage, rename and metadata per move; one per
        // released, needed and metadata-only path; one per source directory), so that an
        // initial sync's list is allocated once instead of doubling past it.
        let src_dirs = self.src.iter().filter(|(_, e)| e.is_dir()).count();
        let Classes {
            released,
            needed,
            metas,
            ..
        } = &classes;
        let mut ops = Vec::with_capacity(
            3 * moves.len() + released.len() + needed.len() + metas.len() + src_dirs,
        );
        let staged = self.emit_stage(&moves, &gone, &mut ops);
        let late = self.emit_remove(released, &moves, &built.lingering, &mut ops);
        self.emit_mkdir(needed, &mut ops);
        let moved_meta = self.emit_rename(moves, &staged, &mut ops);
        // Steps 5 and 7 were built with the sources they copy or link from.
        ops.extend(built.copies);
        ops.extend(late);
        self.emit_write(&built.writes, &mut ops);
        ops.extend(built.links);
        // Step 8: moved files, metadata-only changes, then directories.
        ops.extend(moved_meta);
        self.emit_meta(metas, &mut ops);
        if self.caps.directories == Directories::Real {
            self.emit_dir_meta(metas, &mut ops);
        }

        // At most one item per change: sized up front, as an initial sync has one per path.
        let items = self.status_items(&ops, &classes, changes.len());
        Plan {
            ops,
            items,
            bytes_to_copy: built.bytes,
            unsupported,
            source: Vec::new(),
        }
    }

    /// Phase 2, whole-directory moves: a needed directory with children takes a released
    /// directory with children and the same tree hash. A replica subtree is moved at most once
    /// and never overlaps another moved away; a needed directory inside one moved in is not
    /// matched again. Returns the moves and takes what they carry out of `classes`: the
    /// subtrees moved away are no longer released, the subtrees moved in no longer needed.
    fn match_dir_moves<'c>(&self, classes: &mut Classes<'c>) -> Vec<Move<'c>> {
        let mut dir_pool: HashMap<Hash, VecDeque<&RelPath>> = HashMap::new();
        for &(path, e) in &classes.released {
            if let Content::Dir { tree: Some(h) } = e.content
                && self.has_children(self.dst, path)
            {
                dir_pool.entry(h).or_default().push_back(path);
            }
        }
        let mut consumed: Vec<RelPath> = Vec::new(); // replica subtrees moved away whole
        let mut covered: HashSet<RelPath> = HashSet::new(); // source subtrees moved in whole
        let mut moves = Vec::new();
        for &(path, e, _) in &classes.needed {
            let Content::Dir { tree: Some(h) } = e.content else {
                continue;
            };
            if under_any(&covered, path) || !self.has_children(self.src, path) {
                continue;
            }
            let Some(q) = dir_pool.get_mut(&h) else {
                continue;
            };
            let pick = q.iter().position(|r| {
                !consumed
                    .iter()
                    .any(|c| c == *r || c.is_ancestor_of(r) || r.is_ancestor_of(c))
            });
            if let Some(k) = pick {
                let from = q.remove(k).expect("index is in range");
                consumed.push(from.clone());
                covered.insert(path.clone());
                moves.push(Move {
                    from: from.clone(),
                    to: path.clone(),
                    entry: e,
                });
            }
        }
        let is_consumed = |p: &RelPath| consumed.iter().any(|c| c == p || c.is_ancestor_of(p));
        classes.released.retain(|(p, _)| !is_consumed(p));
        classes
            .needed
            .retain(|(p, ..)| !under_any(&covered, p) && !covered.contains(*p));
        moves
    }

    /// Phase 3, file moves and copy sources: each needed file gets its content from a released
    /// file with its hash (a move, added to `moves`), else a copy of a replica file that stays
    /// or was just moved in, else the source; a hard link links to its leader. Never from its
    /// own path, and never from a path in `gone`.
    fn match_files<'c>(
        &self,
        classes: &Classes<'c>,
        gone: &HashSet<&RelPath>,
        moves: &mut Vec<Move<'c>>,
    ) -> Built<'c> {
        let mut pools = Pools {
            vanishing: self.vanishing_files(&classes.released),
            lingering: HashSet::new(),
            stable: self.stable_files(&classes.needed, gone),
            moved_in: self.moved_in(moves),
        };
        let mut built = Built::default();
        for &(path, e, code) in &classes.needed {
            match &e.content {
                Content::File { hash, size } => {
                    if let Some(leader) = self.leader(e) {
                        built.links.push(Op::Link {
                            leader: leader.clone(),
                            path: path.clone(),
                            src: self.src_ref(e),
                            code,
                        });
                        continue;
                    }
                    let source = match hash {
                        None => Source::Fresh,
                        Some(h) => self.find_source(h, path, &mut pools),
                    };
                    match source {
                        Source::Move(from) => {
                            if let Some(h) = hash {
                                pools.moved_in.entry(*h).or_insert_with(|| path.clone());
                            }
                            moves.push(Move {
                                from,
                                to: path.clone(),
                                entry: e,
                            });
                        }
                        Source::Copy(from, trusted) => built.copies.push(Op::Copy {
                            trusted: trusted.map(Box::new),
                            from,
                            to: path.clone(),
                            src: self.src_ref(e),
                        }),
                        Source::Fresh => {
                            built.bytes += size;
                            built.writes.push((path, e, code));
                        }
                    }
                }
                Content::Symlink { .. } => built.writes.push((path, e, code)),
                Content::Dir { .. } | Content::Special => {}
            }
        }
        built.lingering = pools.lingering;
        built
    }

    /// The hard-link leader `e` is linked to: none where the replica has no hard links (each
    /// link is written as a file of its own) or does not get the leader.
    fn leader<'e>(&self, e: &'e Entry) -> Option<&'e RelPath> {
        e.link
            .as_ref()
            .filter(|l| self.caps.hard_links && !self.refused.contains(*l))
    }

    /// On a replica without rename, whether the released file at `path` can stay in place until
    /// the copies are done (the late removals of step 5): the source has nothing there and no ancestor of it
    /// becomes a file or symlink, so no earlier step needs its place or its directory's.
    fn can_linger(&self, path: &RelPath) -> bool {
        if self.src_kind(path).is_some() {
            return false;
        }
        let mut p = path.parent();
        while let Some(q) = p {
            if matches!(self.src_kind(&q), Some(k) if k != Kind::Dir) {
                return false;
            }
            p = q.parent();
        }
        true
    }

    /// Released files that can be moved, by content.
    /// A file with other hard links in the replica is never moved: renaming one link onto
    /// another of the same inode succeeds without doing anything (POSIX rename).
    fn vanishing_files<'c>(
        &self,
        released: &[(&'c RelPath, &'c Entry)],
    ) -> HashMap<Hash, VecDeque<&'c RelPath>> {
        let linked: HashSet<&RelPath> = self
            .dst
            .iter()
            .filter_map(|(_, e)| e.link.as_ref())
            .collect();
        let mut pool: HashMap<Hash, VecDeque<&RelPath>> = HashMap::new();
        let copies = self.caps.server_copy != ServerCopy::None;
        for &(path, e) in released {
            if e.link.is_some() || linked.contains(path) {
                continue;
            }
            if self.caps.rename == Rename::None && !(copies && self.can_linger(path)) {
                continue;
            }
            if let (Kind::File, Some(h)) = (e.kind(), e.file_hash()) {
                pool.entry(h).or_default().push_back(path);
            }
        }
        pool
    }

    /// Replica files that stay where they are, by content: one pass, filtered by the hashes
    /// wanted when those are fewer than the replica files.
    fn stable_files(
        &self,
        needed: &[(&RelPath, &Entry, Code)],
        gone: &HashSet<&RelPath>,
    ) -> HashMap<Hash, RelPath> {
        let replica_files = self.dst.iter().chain(self.copy_sources);
        let wanted: Option<HashSet<Hash>> = (needed.len() < self.dst.len()).then(|| {
            needed
                .iter()
                .filter(|(_, e, _)| e.link.is_none())
                .filter_map(|(_, e, _)| e.file_hash())
                .collect()
        });
        let mut stable: HashMap<Hash, RelPath> = HashMap::new();
        if wanted.as_ref().is_none_or(|w| !w.is_empty()) {
            for (p, e) in replica_files {
                if let Some(h) = e.file_hash()
                    && wanted.as_ref().is_none_or(|w| w.contains(&h))
                    && !gone.contains(p)
                {
                    stable.entry(h).or_insert_with(|| p.clone());
                }
            }
        }
        stable
    }

    /// Files that are in place once the directory moves are done, by content.
    fn moved_in(&self, moves: &[Move]) -> HashMap<Hash, RelPath> {
        let mut moved_in: HashMap<Hash, RelPath> = HashMap::new();
        for Move { from, to, .. } in moves {
            for (p, e) in &self.dst[from.descendants_in(self.dst, |x| &x.0)] {
                if let Some(h) = e.file_hash() {
                    moved_in.entry(h).or_insert_with(|| p.rebase(from, to));
                }
            }
        }
        moved_in
    }

    /// Where a needed file with content `h` at `path` gets it from: a move of a released file
    /// (a copy from one that lingers, without rename), else a copy, else the source.
    fn find_source(&self, h: &Hash, path: &RelPath, pools: &mut Pools) -> Source {
        match self.caps.rename {
            Rename::Atomic => {
                if let Some(q) = pools.vanishing.get_mut(h)
                    && let Some(k) = q.iter().position(|r| *r != path)
                {
                    let from = q.remove(k).expect("index is in range");
                    return Source::Move(from.clone());
                }
            }
            // Lingering files are not in the source, so never at `path`.
            Rename::None => {
                if let Some(from) = pools.vanishing.get(h).and_then(|q| q.front()) {
                    pools.lingering.insert((*from).clone());
                    return Source::Copy((*from).clone(), lookup(self.dst, from).cloned());
                }
            }
        }
        if self.caps.server_copy == ServerCopy::None {
            return Source::Fresh;
        }
        if let Some(from) = pools.stable.get(h).filter(|f| *f != path) {
            let trusted = lookup(self.dst, from).or_else(|| lookup(self.copy_sources, from));
            return Source::Copy(from.clone(), trusted.cloned());
        }
        match pools.moved_in.get(h) {
            Some(from) if from != path => Source::Copy(from.clone(), None),
            _ => Source::Fresh,
        }
    }

    /// Phase 4, step 1: stages every move source that [`Self::direct_moves`] does not rename straight
    /// to its target. Returns the staging name of each staged source.
    fn emit_stage(
        &mut self,
        moves: &[Move],
        gone: &HashSet<&RelPath>,
        ops: &mut Vec<Op>,
    ) -> HashMap<RelPath, RelPath> {
        let direct = self.direct_moves(moves, gone);
        let mut staged = HashMap::new();
        for Move { from, .. } in moves {
            if direct.contains(from) {
                continue;
            }
            let tmp = self.tmp_name();
            ops.push(Op::Stage {
                from: from.clone(),
                tmp: tmp.clone(),
            });
            staged.insert(from.clone(), tmp);
        }
        staged
    }

    /// Phase 4, step 2: removes the released nodes that are neither moved nor replaced in place,
    /// children first (reverse canonical order). Returns the late removals of step 5: the
    /// `lingering` copy sources and their released ancestors.
    fn emit_remove(
        &self,
        released: &[(&RelPath, &Entry)],
        moves: &[Move],
        lingering: &HashSet<RelPath>,
        ops: &mut Vec<Op>,
    ) -> Vec<Op> {
        // A move's target was a vanishing node too (a Modify); it was staged, not removed.
        let move_sources: HashSet<&RelPath> = moves.iter().map(|m| &m.from).collect();
        let mut removals: Vec<(&RelPath, Kind)> = released
            .iter()
            .filter(|(p, e)| {
                // Files and symlinks of unchanged kind are replaced in place, not removed.
                let in_place = self.src_kind(p) == Some(e.kind()) && e.kind() != Kind::Dir;
                !move_sources.contains(*p) && !in_place
            })
            .map(|(p, e)| (*p, e.kind()))
            .collect();
        removals.sort_by(|a, b| b.0.cmp(a.0));
        let mut late_paths: HashSet<&[u8]> = HashSet::new();
        for l in lingering {
            late_paths.insert(l.as_bytes());
            let mut q = l.parent_bytes();
            while let Some(b) = q.filter(|b| !b.is_empty()) {
                late_paths.insert(b);
                q = Some(parent_of(b));
            }
        }
        let mut late = Vec::new();
        for (path, kind) in removals {
            let op = Op::Remove {
                path: path.clone(),
                kind,
            };
            match late_paths.contains(path.as_bytes()) {
                true => late.push(op),
                false => ops.push(op),
            }
        }
        late
    }

    /// Phase 4, step 3: creates the needed directories, parents first (canonical order).
    fn emit_mkdir(&self, needed: &[(&RelPath, &Entry, Code)], ops: &mut Vec<Op>) {
        for &(path, e, code) in needed {
            if e.is_dir() {
                ops.push(Op::Mkdir {
                    path: path.clone(),
                    src: self.src_ref(e),
                    code,
                });
            }
        }
    }

    /// Phase 4, step 4: renames every move to its target, from its staging name or straight from its
    /// source. Returns the metadata operations of moved files whose metadata differ, for
    /// step 8 (a moved directory gets its metadata with the other directories).
    fn emit_rename(
        &self,
        moves: Vec<Move>,
        staged: &HashMap<RelPath, RelPath>,
        ops: &mut Vec<Op>,
    ) -> Vec<Op> {
        let mut moved_meta = Vec::new();
        for Move { from, to, entry: e } in moves {
            let old = lookup(self.dst, &from).expect("a move source is in the replica");
            if !old.same_meta(e, self.owners) && !e.is_dir() {
                moved_meta.push(Op::SetMeta {
                    path: to.clone(),
                    src: self.src_ref(e),
                });
            }
            ops.push(Op::Rename {
                tmp: staged.get(&from).unwrap_or(&from).clone(),
                orig: from,
                to,
                src: self.src_ref(e),
            });
        }
        moved_meta
    }

    /// Phase 4, step 6: writes files and symlinks from the source.
    fn emit_write(&self, writes: &[(&RelPath, &Entry, Code)], ops: &mut Vec<Op>) {
        for &(path, e, code) in writes {
            let (path, src) = (path.clone(), self.src_ref(e));
            ops.push(match e.kind() {
                Kind::Symlink => Op::Symlink { path, src, code },
                _ => Op::Write { path, src, code },
            });
        }
    }

    /// Phase 4, step 8: metadata-only changes of files and symlinks (a directory's comes last).
    fn emit_meta(&self, metas: &[(&RelPath, &Entry)], ops: &mut Vec<Op>) {
        for &(path, e) in metas {
            if !e.is_dir() {
                ops.push(Op::SetMeta {
                    path: path.clone(),
                    src: self.src_ref(e),
                });
            }
        }
    }

    /// Phase 4, step 8, last: directory metadata, children first, of every directory that was created,
    /// moved, changed, or had an entry added or removed (which bumps its mtime) by `ops`, and
    /// of the metadata-only changed directories in `metas`.
    fn emit_dir_meta(&self, metas: &[(&RelPath, &Entry)], ops: &mut Vec<Op>) {
        let mut dirs: HashSet<&[u8]> = HashSet::new();
        for op in ops.iter() {
            match op {
                Op::Stage { from, tmp } => {
                    touch(&mut dirs, from);
                    touch(&mut dirs, tmp);
                }
                Op::Rename { tmp, to, .. } => {
                    touch(&mut dirs, tmp);
                    touch(&mut dirs, to);
                    dirs.insert(to.as_bytes());
                }
                Op::Mkdir { path, .. } => {
                    touch(&mut dirs, path);
                    dirs.insert(path.as_bytes());
                }
                Op::SetMeta { .. } => {}
                other => touch(&mut dirs, other.target()),
            }
        }
        for (path, e) in metas {
            if e.is_dir() {
                dirs.insert(path.as_bytes());
            }
        }
        let mut dirs: Vec<RelPath> = dirs
            .into_iter()
            .map(|d| RelPath::from_bytes(d).expect("the parent of a valid path is valid"))
            .filter(|d| self.src_kind(d) == Some(Kind::Dir))
            .collect();
        dirs.sort_by(|a, b| b.cmp(a));
        for d in dirs {
            let e = lookup(self.src, &d).expect("filtered on being in the source");
            ops.push(Op::SetMeta {
                path: d,
                src: self.src_ref(e),
            });
        }
    }

    /// Phase 5: one `status` item per change that `ops` carry out (the operation that produces
    /// or removes a path names it), one per needed special file (reported, never created) and
    /// one per metadata-only change; sorted by path.
    fn status_items(&self, ops: &[Op], classes: &Classes, capacity: usize) -> Vec<Item> {
        let item = |code, path: &RelPath, from: Option<&RelPath>| Item {
            code,
            path: path.clone(),
            from: from.cloned(),
        };
        let mut items = Vec::with_capacity(capacity);
        for op in ops {
            match op {
                Op::Rename { orig, to, .. } => items.push(item(Code::Move, to, Some(orig))),
                Op::Copy { from, to, .. } => items.push(item(Code::Copy, to, Some(from))),
                Op::Mkdir { path, code, .. }
                | Op::Write { path, code, .. }
                | Op::Symlink { path, code, .. }
                | Op::Link { path, code, .. } => items.push(item(*code, path, None)),
                // A type change shows as `T` from its needed side; only a plain deletion shows `D`.
                Op::Remove { path, .. } if self.src_kind(path).is_none() => {
                    items.push(item(Code::Delete, path, None));
                }
                Op::Stage { .. } | Op::Remove { .. } | Op::SetMeta { .. } => {}
            }
        }
        for &(path, e, code) in &classes.needed {
            if e.kind() == Kind::Special {
                items.push(item(code, path, None));
            }
        }
        for &(path, _) in &classes.metas {
            items.push(item(Code::Meta, path, None));
        }
        items.sort_unstable_by(|a, b| (&a.path, a.code, &a.from).cmp(&(&b.path, b.code, &b.from)));
        items
    }

    /// The move sources that can be renamed straight to their destination at step 4: the
    /// source is gone from the source tree, the destination is free in the replica, neither is
    /// below the other, and no proper ancestor of either is released, staged, or a move
    /// destination. Steps 1 to 3 then leave both places and their ancestors as they are.
    fn direct_moves(&self, moves: &[Move], gone: &HashSet<&RelPath>) -> HashSet<RelPath> {
        let mut blocked: HashSet<&[u8]> = gone.iter().map(|p| p.as_bytes()).collect();
        for Move { from, to, .. } in moves {
            blocked.insert(from.as_bytes());
            blocked.insert(to.as_bytes());
        }
        let clear_above = |p: &RelPath| {
            let mut q = p.parent_bytes();
            while let Some(b) = q.filter(|b| !b.is_empty()) {
                if blocked.contains(b) {
                    return false;
                }
                q = Some(parent_of(b));
            }
            true
        };
        moves
            .iter()
            .filter(|Move { from, to, .. }| {
                lookup(self.src, from).is_none()
                    && lookup(self.dst, to).is_none()
                    && !from.is_ancestor_of(to)
                    && !to.is_ancestor_of(from)
                    && clear_above(from)
                    && clear_above(to)
            })
            .map(|m| m.from.clone())
            .collect()
    }

    fn has_children(&self, tree: &[(RelPath, Entry)], path: &RelPath) -> bool {
        !path.descendants_in(tree, |x| &x.0).is_empty()
    }

    /// The kind of what the plan puts at `path` (nothing where the replica refuses the source
    /// node).
    fn src_kind(&self, path: &RelPath) -> Option<Kind> {
        if self.refused.contains(path) {
            return None;
        }
        lookup(self.src, path).map(Entry::kind)
    }
}

/// Records the parent directory of `p`, if any, as one whose metadata must be restored.
fn touch<'a>(dirs: &mut HashSet<&'a [u8]>, p: &'a RelPath) {
    if let Some(parent) = p.parent_bytes() {
        dirs.insert(parent);
    }
}

fn under_any(set: &HashSet<RelPath>, path: &RelPath) -> bool {
    if set.is_empty() {
        return false;
    }
    let mut p = path.parent();
    while let Some(q) = p {
        if set.contains(&q) {
            return true;
        }
        p = q.parent();
    }
    false
}

fn lookup<'t>(tree: &'t [(RelPath, Entry)], path: &RelPath) -> Option<&'t Entry> {
    tree.binary_search_by(|(p, _)| p.cmp(path))
        .ok()
        .map(|i| &tree[i].1)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::diff::diff;
    use crate::diff::tests::{dir, file, link, p, tree};

    const POSIX: Capabilities = Capabilities::posix(false);

    /// Runs a plan on an in-memory replica, enforcing what a filesystem enforces (parents
    /// exist, a directory is empty before it is removed, a rename does not land on a directory)
    /// and what `caps` allows, and returns the final tree.
    fn simulate(
        plan: &Plan,
        dst: &[(RelPath, Entry)],
        caps: &Capabilities,
    ) -> BTreeMap<RelPath, Entry> {
        for op in &plan.ops {
            let allowed = match op {
                Op::Stage { .. } | Op::Rename { .. } => caps.rename == Rename::Atomic,
                Op::Copy { .. } => caps.server_copy != ServerCopy::None,
                Op::Link { .. } => caps.hard_links,
                Op::Symlink { .. } => caps.symlinks,
                Op::SetMeta { src, .. } => {
                    !plan.entry(*src).is_dir() || caps.directories == Directories::Real
                }
                _ => true,
            };
            assert!(allowed, "{op:?} on a replica that cannot do it");
            if caps.names == Names::Utf8 {
                assert!(
                    std::str::from_utf8(op.target().as_bytes()).is_ok(),
                    "{op:?}"
                );
            }
        }
        let mut m: BTreeMap<RelPath, Entry> = dst.iter().cloned().collect();
        let parent_ok = |m: &BTreeMap<RelPath, Entry>, path: &RelPath| {
            let parent = path.parent().expect("not the root");
            assert!(
                m.get(&parent).is_some_and(Entry::is_dir),
                "no parent for {path}"
            );
        };
        let move_tree = |m: &mut BTreeMap<RelPath, Entry>, from: &RelPath, to: &RelPath| {
            let keys: Vec<RelPath> = m
                .keys()
                .filter(|k| *k == from || from.is_ancestor_of(k))
                .cloned()
                .collect();
            assert!(!keys.is_empty(), "rename of missing {from}");
            if let Some(old) = m.get(to) {
                assert!(!old.is_dir(), "rename onto directory {to}");
            }
            for k in keys {
                let e = m.remove(&k).unwrap();
                m.insert(k.rebase(from, to), e);
            }
        };
        for op in &plan.ops {
            match op {
                Op::Stage { from, tmp } => {
                    assert!(!m.contains_key(tmp));
                    move_tree(&mut m, from, tmp);
                }
                Op::Remove { path, .. } => {
                    assert!(m.contains_key(path), "remove of missing {path}");
                    assert!(
                        !m.keys().any(|k| path.is_ancestor_of(k)),
                        "remove of non-empty {path}"
                    );
                    m.remove(path);
                }
                Op::Mkdir { path, src, .. } => {
                    parent_ok(&m, path);
                    assert!(!m.contains_key(path), "mkdir over {path}");
                    m.insert(path.clone(), plan.entry(*src).clone());
                }
                Op::Rename { tmp, to, .. } => {
                    parent_ok(&m, to);
                    move_tree(&mut m, tmp, to);
                }
                Op::Copy { from, to, src, .. } => {
                    parent_ok(&m, to);
                    let f = m.get(from).expect("copy source exists");
                    assert_eq!(
                        f.file_hash(),
                        plan.entry(*src).file_hash(),
                        "copy {from} has other content"
                    );
                    m.insert(to.clone(), plan.entry(*src).clone());
                }
                Op::Write { path, src, .. } | Op::Symlink { path, src, .. } => {
                    parent_ok(&m, path);
                    assert!(
                        !m.get(path).is_some_and(Entry::is_dir),
                        "write over dir {path}"
                    );
                    m.insert(path.clone(), plan.entry(*src).clone());
                }
                Op::Link {
                    leader, path, src, ..
                } => {
                    parent_ok(&m, path);
                    assert_eq!(
                        m.get(leader).and_then(Entry::file_hash),
                        plan.entry(*src).file_hash()
                    );
                    m.insert(path.clone(), plan.entry(*src).clone());
                }
                Op::SetMeta { path, src } => {
                    m.get_mut(path).expect("meta of existing").meta = plan.entry(*src).meta;
                }
            }
        }
        m
    }

    /// Plans src over dst, runs the plan, and checks the result mirrors src.
    fn check(src: &[(RelPath, Entry)], dst: &[(RelPath, Entry)]) -> Plan {
        check_with(src, dst, &[])
    }

    /// [`check`] on a replica that can do what `caps` says: the plan uses nothing else, and
    /// the result mirrors the source but for the nodes the replica refuses.
    fn check_caps(src: &[(RelPath, Entry)], dst: &[(RelPath, Entry)], caps: &Capabilities) -> Plan {
        check_all(src, dst, &[], caps)
    }

    /// [`check`] with replica files that the trees left out as unchanged, offered as copy
    /// sources. A special file is reported, not created.
    fn check_with(
        src: &[(RelPath, Entry)],
        dst: &[(RelPath, Entry)],
        copy_sources: &[(RelPath, Entry)],
    ) -> Plan {
        check_all(src, dst, copy_sources, &POSIX)
    }

    fn check_all(
        src: &[(RelPath, Entry)],
        dst: &[(RelPath, Entry)],
        copy_sources: &[(RelPath, Entry)],
        caps: &Capabilities,
    ) -> Plan {
        let changes = diff(src, dst, false, &|_| false);
        let plan = plan_with(&changes, src, dst, copy_sources, caps).with_source(src.to_vec());
        let mut before = dst.to_vec();
        before.extend_from_slice(copy_sources);
        before.sort_by(|x, y| x.0.cmp(&y.0));
        let mut out = simulate(&plan, &before, caps);
        for (path, _) in copy_sources {
            out.remove(path);
        }
        let refused = |p: &RelPath, e: &Entry| {
            let mut q = Some(p.clone());
            while let Some(a) = q {
                if let Some(ae) = lookup(src, &a)
                    && caps.refuses(&a, ae).is_some()
                {
                    return true;
                }
                q = a.parent();
            }
            caps.refuses(p, e).is_some()
        };
        let want: BTreeMap<RelPath, Shape> = src
            .iter()
            .filter(|(p, e)| e.kind() != Kind::Special && !refused(p, e))
            .map(|(p, e)| (p.clone(), shape(&kept(e, caps))))
            .collect();
        let got: BTreeMap<RelPath, Shape> = out
            .iter()
            .map(|(p, e)| (p.clone(), shape(&kept(e, caps))))
            .collect();
        assert_eq!(got, want, "plan: {:#?}", plan.ops);
        plan
    }

    /// What must match between source and result: kind, content, mode, mtime.
    type Shape = (Kind, Option<Hash>, Option<Vec<u8>>, u32, i64);

    /// `e` with the metadata a replica with `caps` keeps.
    fn kept(e: &Entry, caps: &Capabilities) -> Entry {
        Entry {
            meta: caps.keep_meta(e.kind(), e.meta),
            ..e.clone()
        }
    }

    fn shape(e: &Entry) -> Shape {
        let target = match &e.content {
            Content::Symlink { target } => Some(target.clone()),
            _ => None,
        };
        (
            e.kind(),
            e.file_hash(),
            target,
            e.meta.mode,
            e.meta.mtime.sec,
        )
    }

    fn lines(plan: &Plan) -> Vec<String> {
        plan.items
            .iter()
            .map(|i| match &i.from {
                Some(f) => format!("{} {f} -> {}", i.code.letter(), i.path),
                None => format!("{} {}", i.code.letter(), i.path),
            })
            .collect()
    }

    fn count(plan: &Plan, pred: impl Fn(&Op) -> bool) -> usize {
        plan.ops.iter().filter(|o| pred(o)).count()
    }

    #[test]
    fn file_rename_is_a_move() {
        let dst = tree(vec![("a", file("x", 1))]);
        let src = tree(vec![("b", file("x", 1))]);
        let plan = check(&src, &dst);
        assert_eq!(lines(&plan), ["R a -> b"]);
        assert_eq!(count(&plan, |o| matches!(o, Op::Write { .. })), 0);
    }

    #[test]
    fn directory_move_is_one_rename() {
        let mut d = vec![("old", dir())];
        let mut s = vec![("new", dir())];
        let names: Vec<String> = (0..50).map(|i| format!("f{i}")).collect();
        for (i, n) in names.iter().enumerate() {
            d.push((
                Box::leak(format!("old/{n}").into_boxed_str()),
                file(n, i as i64),
            ));
            s.push((
                Box::leak(format!("new/{n}").into_boxed_str()),
                file(n, i as i64),
            ));
        }
        d.push(("old/sub", dir()));
        s.push(("new/sub", dir()));
        let (dst, src) = (tree(d), tree(s));
        let plan = check(&src, &dst);
        assert_eq!(lines(&plan), ["R old -> new"]);
        assert_eq!(count(&plan, |o| matches!(o, Op::Rename { .. })), 1);
        assert_eq!(count(&plan, |o| matches!(o, Op::Remove { .. })), 0);
    }

    #[test]
    fn swap_and_three_cycle() {
        let dst = tree(vec![("a", file("A", 1)), ("b", file("B", 1))]);
        let src = tree(vec![("a", file("B", 1)), ("b", file("A", 1))]);
        let plan = check(&src, &dst);
        assert_eq!(lines(&plan), ["R b -> a", "R a -> b"]);

        let dst = tree(vec![
            ("a", file("A", 1)),
            ("b", file("B", 1)),
            ("c", file("C", 1)),
        ]);
        let src = tree(vec![
            ("a", file("C", 1)),
            ("b", file("A", 1)),
            ("c", file("B", 1)),
        ]);
        let plan = check(&src, &dst);
        assert_eq!(count(&plan, |o| matches!(o, Op::Write { .. })), 0);
    }

    #[test]
    fn directory_swap() {
        let dst = tree(vec![
            ("x", dir()),
            ("x/1", file("one", 1)),
            ("y", dir()),
            ("y/2", file("two", 1)),
        ]);
        let src = tree(vec![
            ("x", dir()),
            ("x/2", file("two", 1)),
            ("y", dir()),
            ("y/1", file("one", 1)),
        ]);
        let plan = check(&src, &dst);
        assert_eq!(count(&plan, |o| matches!(o, Op::Write { .. })), 0);
    }

    #[test]
    fn type_changes_in_every_direction() {
        let dst = tree(vec![
            ("f2d", file("f", 1)),
            ("d2f", dir()),
            ("d2f/inner", file("i", 1)),
            ("f2l", file("g", 1)),
            ("l2d", link("t")),
        ]);
        let src = tree(vec![
            ("f2d", dir()),
            ("f2d/new", file("n", 1)),
            ("d2f", file("now a file", 1)),
            ("f2l", link("target")),
            ("l2d", dir()),
        ]);
        let plan = check(&src, &dst);
        let l = lines(&plan);
        assert!(l.contains(&"T f2d".to_string()) && l.contains(&"T d2f".to_string()));
        assert!(l.contains(&"D d2f/inner".to_string()));
    }

    #[test]
    fn moved_file_into_a_type_changed_path() {
        // `a` was a file and becomes a directory holding the old content of `b`.
        let dst = tree(vec![("a", file("A", 1)), ("b", file("B", 1))]);
        let src = tree(vec![("a", dir()), ("a/b", file("B", 1))]);
        let plan = check(&src, &dst);
        assert!(lines(&plan).contains(&"R b -> a/b".to_string()));
    }

    #[test]
    fn copies_come_from_stable_files_and_moved_ones() {
        let dst = tree(vec![("keep", file("K", 1)), ("gone", file("G", 1))]);
        let src = tree(vec![
            ("keep", file("K", 1)),
            ("k2", file("K", 1)),
            ("g1", file("G", 1)),
            ("g2", file("G", 1)),
        ]);
        let plan = check(&src, &dst);
        let l = lines(&plan);
        assert!(l.contains(&"C keep -> k2".to_string()), "{l:?}");
        assert!(l.contains(&"R gone -> g1".to_string()), "{l:?}");
        assert!(l.contains(&"C g1 -> g2".to_string()), "{l:?}");
        assert_eq!(count(&plan, |o| matches!(o, Op::Write { .. })), 0);
    }

    #[test]
    fn copy_source_never_lies_in_a_directory_moved_away() {
        let dst = tree(vec![
            ("d", dir()),
            ("d/f", file("F", 1)),
            ("d/g", file("G", 1)),
        ]);
        let src = tree(vec![
            ("e", dir()),
            ("e/f", file("F", 1)),
            ("e/g", file("G", 1)),
            ("z", file("F", 1)),
        ]);
        check(&src, &dst);
    }

    #[test]
    fn files_moved_with_their_directory_are_copy_sources() {
        let dst = tree(vec![("d", dir()), ("d/f", file("F", 1))]);
        let src = tree(vec![
            ("e", dir()),
            ("e/f", file("F", 1)),
            ("z", file("F", 1)),
        ]);
        let plan = check(&src, &dst);
        assert!(
            lines(&plan).contains(&"C e/f -> z".to_string()),
            "{:?}",
            lines(&plan)
        );
    }

    #[test]
    fn moved_file_with_new_mode_gets_its_metadata() {
        let dst = tree(vec![("a", file("x", 1))]);
        let mut e = file("x", 7);
        e.meta.mode = 0o600;
        let src = tree(vec![("b", e)]);
        let plan = check(&src, &dst);
        assert!(
            plan.ops
                .iter()
                .any(|o| matches!(o, Op::SetMeta { path, .. } if *path == p("b")))
        );
    }

    #[test]
    fn hard_links_follow_their_leader() {
        let dst = tree(vec![]);
        let mut b = file("same", 1);
        b.link = Some(p("a"));
        let src = tree(vec![("a", file("same", 1)), ("b", b)]);
        let plan = check(&src, &dst);
        let link_at = plan
            .ops
            .iter()
            .position(|o| matches!(o, Op::Link { .. }))
            .unwrap();
        let write_at = plan
            .ops
            .iter()
            .position(|o| matches!(o, Op::Write { .. }) || matches!(o, Op::Copy { .. }))
            .unwrap();
        assert!(write_at < link_at);
    }

    #[test]
    fn unknown_hashes_are_written_not_matched() {
        let dst = tree(vec![("a", file("x", 1))]);
        let mut e = file("x", 1);
        e.content = Content::File {
            size: 1,
            hash: None,
        };
        let src = tree(vec![("b", e)]);
        let changes = diff(&src, &dst, false, &|_| false);
        let plan = plan(&changes, &src, &dst, &POSIX);
        assert_eq!(lines(&plan), ["D a", "A b"]);
    }

    #[test]
    fn hard_linked_replica_files_are_not_move_sources() {
        // In the replica, b is a second link to a's inode; in the source they differ.
        let mut b = file("Y", 1);
        b.link = Some(p("a"));
        let dst = tree(vec![("a", file("Y", 1)), ("b", b)]);
        let src = tree(vec![("a", file("X", 1)), ("b", file("Y", 1))]);
        let plan = check(&src, &dst);
        assert_eq!(
            count(&plan, |o| matches!(o, Op::Stage { .. })),
            0,
            "{:?}",
            plan.ops
        );
    }

    fn staged(plan: &Plan) -> usize {
        count(plan, |o| matches!(o, Op::Stage { .. }))
    }

    #[test]
    fn a_move_nothing_else_touches_is_one_rename_without_staging() {
        let dst = tree(vec![
            ("a", file("A", 1)),
            ("old", dir()),
            ("old/f", file("F", 2)),
            ("old/g", file("G", 3)),
        ]);
        let src = tree(vec![
            ("b", file("A", 1)),
            ("new", dir()),
            ("new/f", file("F", 2)),
            ("new/g", file("G", 3)),
        ]);
        let plan = check(&src, &dst);
        assert_eq!(staged(&plan), 0, "{:#?}", plan.ops);
        let renames: Vec<(String, String)> = plan
            .ops
            .iter()
            .filter_map(|o| match o {
                Op::Rename { tmp, orig, to, .. } => {
                    assert_eq!(tmp, orig);
                    Some((orig.to_string(), to.to_string()))
                }
                _ => None,
            })
            .collect();
        assert_eq!(
            renames,
            [("old".into(), "new".into()), ("a".into(), "b".into())]
        );
    }

    #[test]
    fn moves_that_meet_other_steps_are_staged() {
        // A swap: each destination is the other's source.
        let dst = tree(vec![("a", file("A", 1)), ("b", file("B", 1))]);
        let src = tree(vec![("a", file("B", 1)), ("b", file("A", 1))]);
        assert_eq!(staged(&check(&src, &dst)), 2);
        // Out of a directory that is removed (children first, so it must leave before).
        let dst = tree(vec![
            ("x", dir()),
            ("x/f", file("F", 1)),
            ("x/g", file("G", 1)),
        ]);
        let src = tree(vec![("f", file("F", 1))]);
        assert_eq!(staged(&check(&src, &dst)), 1);
        // Into a directory that replaces a file.
        let dst = tree(vec![("a", file("A", 1)), ("t", file("T", 1))]);
        let src = tree(vec![("t", dir()), ("t/a", file("A", 1))]);
        assert_eq!(staged(&check(&src, &dst)), 1);
        // From a place a new directory takes (made before moves land).
        let dst = tree(vec![("a", file("A", 1))]);
        let src = tree(vec![
            ("a", dir()),
            ("a/y", file("Y", 1)),
            ("b", file("A", 1)),
        ]);
        assert_eq!(staged(&check(&src, &dst)), 1);
        // Into the place of the directory it came from.
        let dst = tree(vec![("d", dir()), ("d/f", file("F", 1))]);
        let src = tree(vec![("d", file("F", 1))]);
        check(&src, &dst);
    }

    /// Every op of `plan`, with the source path each one refers to.
    fn render(plan: &Plan) -> Vec<String> {
        let at = |r: &SrcRef| plan.source[r.0 as usize].0.to_string();
        plan.ops
            .iter()
            .map(|op| match op {
                Op::Stage { from, tmp } => format!("stage {from} {tmp}"),
                Op::Remove { path, kind } => format!("remove {path} {kind:?}"),
                Op::Mkdir { path, src, code } => {
                    format!("mkdir {path} <{}> {}", at(src), code.letter())
                }
                Op::Rename { tmp, orig, to, src } => {
                    format!("rename {tmp} {orig} {to} <{}>", at(src))
                }
                Op::Copy {
                    from,
                    to,
                    src,
                    trusted,
                } => format!(
                    "copy {from} {to} <{}> trusted={}",
                    at(src),
                    trusted.is_some()
                ),
                Op::Write { path, src, code } => {
                    format!("write {path} <{}> {}", at(src), code.letter())
                }
                Op::Symlink { path, src, code } => {
                    format!("symlink {path} <{}> {}", at(src), code.letter())
                }
                Op::Link {
                    leader,
                    path,
                    src,
                    code,
                } => format!("link {leader} {path} <{}> {}", at(src), code.letter()),
                Op::SetMeta { path, src } => format!("setmeta {path} <{}>", at(src)),
            })
            .collect()
    }

    #[test]
    fn every_step_in_its_order() {
        let mut m_new = file("M", 1);
        m_new.meta.mode = 0o600;
        let mut md_new = dir();
        md_new.meta.mode = 0o700;
        let mut h2 = file("H", 1);
        h2.link = Some(p("h"));
        let special = Entry {
            content: Content::Special,
            ..file("", 0)
        };
        let dst = tree(vec![
            ("a", file("A", 1)),
            ("dd", dir()),
            ("dd/q", file("Q", 1)),
            ("gone", file("GONE", 1)),
            ("keep", file("K", 1)),
            ("m", file("M", 1)),
            ("md", dir()),
            ("md/z", file("Z", 1)),
            ("mod", file("old", 1)),
            ("old", dir()),
            ("old/f", file("F", 1)),
            ("old/g", file("G", 1)),
            ("s1", file("S1", 1)),
            ("s2", file("S2", 1)),
            ("t", file("T", 1)),
        ]);
        let src = tree(vec![
            ("b", file("A", 2)),
            ("big2", file("BIG", 1)),
            ("fifo", special),
            ("h", file("H", 1)),
            ("h2", h2),
            ("k2", file("K", 1)),
            ("keep", file("K", 1)),
            ("ln", link("target")),
            ("m", m_new),
            ("md", md_new),
            ("md/z", file("Z", 1)),
            ("mod", file("new", 1)),
            ("new", dir()),
            ("new/f", file("F", 1)),
            ("new/g", file("G", 1)),
            ("s1", file("S2", 1)),
            ("s2", file("S1", 1)),
            ("t", dir()),
            ("t/x", file("X", 1)),
            ("w", file("W", 1)),
        ]);
        // An unchanged replica file the join dropped from the trees, kept as a copy source.
        let copy_sources = tree(vec![("big", file("BIG", 1))]);
        let plan = check_with(&src, &dst, &copy_sources[1..]);
        let ops = render(&plan);
        let want_ops = [
            "stage s2 .dirsync-tmp-stage-0",
            "stage s1 .dirsync-tmp-stage-1",
            "remove t File",
            "remove gone File",
            "remove dd/q File",
            "remove dd Dir",
            "mkdir t <t> T",
            "rename old old new <new>",
            "rename a a b <b>",
            "rename .dirsync-tmp-stage-0 s2 s1 <s1>",
            "rename .dirsync-tmp-stage-1 s1 s2 <s2>",
            "copy big big2 <big2> trusted=true",
            "copy keep k2 <k2> trusted=true",
            "write h <h> A",
            "symlink ln <ln> A",
            "write mod <mod> M",
            "write t/x <t/x> A",
            "write w <w> A",
            "link h h2 <h2> A",
            "setmeta b <b>",
            "setmeta m <m>",
            "setmeta t <t>",
            "setmeta new <new>",
            "setmeta md <md>",
            "setmeta . <.>",
        ];
        assert_eq!(ops, want_ops, "{ops:#?}");
        let want_items = [
            "R a -> b",
            "C big -> big2",
            "D dd",
            "D dd/q",
            "A fifo",
            "D gone",
            "A h",
            "A h2",
            "C keep -> k2",
            "A ln",
            "m m",
            "m md",
            "M mod",
            "R old -> new",
            "R s2 -> s1",
            "R s1 -> s2",
            "T t",
            "A t/x",
            "A w",
        ];
        assert_eq!(lines(&plan), want_items);
        // h, mod, t/x and w come from the source.
        assert_eq!(plan.bytes_to_copy, 6);
    }

    #[test]
    fn stage_names_avoid_existing_paths() {
        let name = format!("{TMP_PREFIX}stage-0");
        let dst = tree(vec![
            ("a", file("A", 1)),
            ("b", file("B", 1)),
            (Box::leak(name.clone().into_boxed_str()), file("z", 1)),
        ]);
        let src = tree(vec![
            ("a", file("B", 1)),
            ("b", file("A", 1)),
            (Box::leak(name.into_boxed_str()), file("z", 1)),
        ]);
        check(&src, &dst);
    }

    fn object_store() -> Capabilities {
        crate::replica::memory::Profile::ObjectStoreLike.capabilities(false)
    }

    fn sftp() -> Capabilities {
        crate::replica::memory::Profile::SftpLike.capabilities(false)
    }

    fn position(plan: &Plan, pred: impl Fn(&Op) -> bool) -> usize {
        plan.ops.iter().position(pred).expect("the op is planned")
    }

    #[test]
    fn without_rename_a_file_move_is_a_copy_then_a_removal() {
        let dst = tree(vec![("a", file("A", 1))]);
        let src = tree(vec![("b", file("A", 1))]);
        let plan = check_caps(&src, &dst, &object_store());
        assert_eq!(lines(&plan), ["D a", "C a -> b"]);
        let copy = position(&plan, |o| matches!(o, Op::Copy { .. }));
        let remove = position(&plan, |o| matches!(o, Op::Remove { .. }));
        assert!(copy < remove, "{:#?}", plan.ops);
        // The same on a POSIX replica is one rename.
        assert_eq!(lines(&check(&src, &dst)), ["R a -> b"]);
    }

    #[test]
    fn without_rename_or_server_copy_a_move_is_written_from_the_source() {
        let caps = Capabilities {
            server_copy: ServerCopy::None,
            ..object_store()
        };
        let dst = tree(vec![("a", file("A", 1))]);
        let src = tree(vec![("b", file("A", 1))]);
        let plan = check_caps(&src, &dst, &caps);
        assert_eq!(lines(&plan), ["D a", "A b"]);
        assert_eq!(plan.bytes_to_copy, 1);
    }

    #[test]
    fn without_rename_a_directory_move_is_new_directories_copies_and_removals() {
        let dst = tree(vec![
            ("old", dir()),
            ("old/f", file("F", 2)),
            ("old/g", file("G", 3)),
            ("old/sub", dir()),
            ("old/sub/h", file("H", 4)),
        ]);
        let src = tree(vec![
            ("new", dir()),
            ("new/f", file("F", 2)),
            ("new/g", file("G", 3)),
            ("new/sub", dir()),
            ("new/sub/h", file("H", 4)),
        ]);
        let plan = check_caps(&src, &dst, &object_store());
        let ops = render(&plan);
        assert_eq!(
            ops,
            [
                "mkdir new <new> A",
                "mkdir new/sub <new/sub> A",
                "copy old/f new/f <new/f> trusted=true",
                "copy old/g new/g <new/g> trusted=true",
                "copy old/sub/h new/sub/h <new/sub/h> trusted=true",
                "remove old/sub/h File",
                "remove old/sub Dir",
                "remove old/g File",
                "remove old/f File",
                "remove old Dir",
            ],
            "{ops:#?}"
        );
        assert_eq!(plan.bytes_to_copy, 0);
    }

    #[test]
    fn without_rename_a_copy_source_whose_place_is_taken_is_not_used() {
        let caps = object_store();
        // A swap: each old content is wanted where the other one is.
        let dst = tree(vec![("a", file("A", 1)), ("b", file("B", 1))]);
        let src = tree(vec![("a", file("B", 1)), ("b", file("A", 1))]);
        let plan = check_caps(&src, &dst, &caps);
        assert_eq!(count(&plan, |o| matches!(o, Op::Write { .. })), 2);
        // A directory that becomes a file holding its child's content: the child goes first.
        let dst = tree(vec![("d", dir()), ("d/f", file("F", 1))]);
        let src = tree(vec![("d", file("F", 1))]);
        let plan = check_caps(&src, &dst, &caps);
        assert_eq!(
            render(&plan),
            ["remove d/f File", "remove d Dir", "write d <d> T"]
        );
        // Out of a directory that stays, into one that is new, next to a removal that is not a
        // copy source: that one is removed first, as on POSIX.
        let dst = tree(vec![
            ("k", dir()),
            ("k/f", file("F", 1)),
            ("z", file("Z", 1)),
        ]);
        let src = tree(vec![("k", dir()), ("n", dir()), ("n/f", file("F", 1))]);
        let plan = check_caps(&src, &dst, &caps);
        assert_eq!(
            render(&plan),
            [
                "remove z File",
                "mkdir n <n> A",
                "copy k/f n/f <n/f> trusted=true",
                "remove k/f File",
            ]
        );
    }

    #[test]
    fn without_server_copy_copies_are_written_and_moves_stay_renames() {
        let dst = tree(vec![("keep", file("K", 1)), ("gone", file("G", 1))]);
        let src = tree(vec![
            ("keep", file("K", 1)),
            ("k2", file("K", 1)),
            ("g1", file("G", 1)),
            ("g2", file("G", 1)),
        ]);
        let plan = check_caps(&src, &dst, &sftp());
        assert_eq!(lines(&plan), ["R gone -> g1", "A g2", "A k2"]);
        assert_eq!(count(&plan, |o| matches!(o, Op::Copy { .. })), 0);
    }

    #[test]
    fn without_hard_links_each_link_is_written_as_its_own_file() {
        let mut b = file("same", 1);
        b.link = Some(p("a"));
        let src = tree(vec![("a", file("same", 1)), ("b", b)]);
        let plan = check_caps(&src, &tree(vec![]), &sftp());
        assert_eq!(count(&plan, |o| matches!(o, Op::Link { .. })), 0);
        assert_eq!(count(&plan, |o| matches!(o, Op::Write { .. })), 2);
        assert_eq!(lines(&plan), ["A a", "A b"]);
    }

    #[test]
    fn refused_symlinks_and_names_are_reported_skipped_and_what_was_there_goes() {
        let raw = |b: &[u8]| RelPath::from_bytes(b).unwrap();
        let mut src = vec![
            (RelPath::root(), dir()),
            (p("ln"), link("target")),
            (p("ok"), file("O", 1)),
            (p("t"), link("x")),
            (raw(b"\xff"), dir()),
            (raw(b"\xff/f"), file("F", 1)),
            (raw(b"\xffg"), file("G", 1)),
        ];
        src.sort_by(|a, b| a.0.cmp(&b.0));
        crate::hash::fill_tree_hashes(&mut src, false);
        let dst = tree(vec![("t", file("T", 1))]);
        let plan = check_caps(&src, &dst, &object_store());
        assert!(
            plan.unsupported
                .iter()
                .all(|e| e.kind == ErrorKind::Unsupported)
        );
        let mut refused: Vec<String> = plan.unsupported.iter().map(|e| e.path.clone()).collect();
        refused.sort();
        let shown = |b: &[u8]| raw(b).to_string();
        let mut want = vec![
            "ln".to_string(),
            "t".to_string(),
            shown(b"\xff"),
            shown(b"\xffg"),
        ];
        want.sort();
        assert_eq!(refused, want, "{:#?}", plan.unsupported);
        assert!(plan.unsupported[0].message.contains("not replicated"));
        assert_eq!(render(&plan), ["remove t File", "write ok <ok> A"]);
        // A POSIX replica takes them all.
        let plan = check(&src, &dst);
        assert!(plan.unsupported.is_empty());
    }

    #[test]
    fn implicit_directories_get_no_metadata() {
        let mut md = dir();
        md.meta.mode = 0o700;
        let dst = tree(vec![("d", dir()), ("md", dir())]);
        let src = tree(vec![("d", dir()), ("d/new", file("N", 1)), ("md", md)]);
        let plan = check_caps(&src, &dst, &object_store());
        assert_eq!(lines(&plan), ["A d/new"]);
        assert_eq!(render(&plan), ["write d/new <d/new> A"]);
        // With real directories, the new entry's directory and the changed one get theirs.
        let plan = check(&src, &dst);
        assert_eq!(
            count(&plan, |o| matches!(o, Op::SetMeta { .. })),
            2,
            "{:#?}",
            plan.ops
        );
    }

    type Tree = Vec<(RelPath, Entry)>;

    /// The trees of a replica that keeps what `caps` says, holding `src` as written, and the
    /// source as scanned with nanosecond times and modes, compared as the replica keeps them.
    fn kept_trees(caps: &Capabilities, src: Vec<(&str, Entry)>) -> (Tree, Tree) {
        let fs = caps.traits(crate::replica::probe::FsTraits::default());
        let mut as_held = src.clone();
        for (_, e) in &mut as_held {
            e.meta = caps.keep_meta(e.kind(), e.meta);
        }
        let mut scanned = tree(src);
        for (_, e) in &mut scanned {
            caps.keep(e, &fs);
        }
        crate::hash::fill_tree_hashes(&mut scanned, false);
        (scanned, tree(as_held))
    }

    #[test]
    fn metadata_the_replica_does_not_keep_is_not_compared_and_subtrees_are_skipped() {
        let fine = |mut e: Entry, nsec: u32, mode: u32| {
            e.meta.mtime.nsec = nsec;
            e.meta.mode = mode;
            e
        };
        let entries = || {
            vec![
                ("d", fine(dir(), 5, 0o750)),
                ("d/f", fine(file("F", 7), 999_999_999, 0o600)),
                ("g", fine(file("G", 8), 1, 0o640)),
            ]
        };
        for caps in [sftp(), object_store()] {
            let (src, dst) = kept_trees(&caps, entries());
            assert_eq!(src[0].1.content, dst[0].1.content, "root tree hashes equal");
            let changes = diff(&src, &dst, false, &|_| false);
            assert!(changes.is_empty(), "{caps:?}: {changes:?}");
            assert!(plan(&changes, &src, &dst, &caps).is_empty());
            // Without the normalisation, each pass would change metadata again.
            let raw = tree(entries());
            assert!(!diff(&raw, &dst, false, &|_| false).is_empty(), "{caps:?}");
        }
    }
}
