//! Pure: turns the list of changes into an ordered list of operations on the replica, finding
//! moves, whole-directory moves and local copies by content hash.
//!
//! Operation order, and why it is safe:
//! 1. `Stage`: every move source (file or whole directory) is renamed to a fresh name at the
//!    replica root. Nothing else can then delete or overwrite it, and swaps and cycles need no
//!    special case.
//! 2. `Remove`: every replica node that does not survive, children before parents (reverse
//!    canonical order). This also clears the way for type changes and frees space first.
//! 3. `Mkdir`: new directories, parents before children.
//! 4. `Rename`: staged nodes into their final places (their parents exist now).
//! 5. `Copy`: local copies from replica files that are stable or were just moved in.
//! 6. `Write` and `Symlink`: content from the source.
//! 7. `Link`: hard links to files that are now in place.
//! 8. `SetMeta`: metadata of moved or unchanged-content nodes, then of every directory whose
//!    entries changed, children before parents, so that no later step bumps an mtime.

use std::collections::{HashMap, HashSet, VecDeque};

use crate::diff::Change;
use crate::entry::{Content, Entry, Hash, Kind, RelPath};

/// One step of a plan. `src` is the source entry the result must match.
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
        src: Entry,
        code: Code,
    },
    /// `orig` is where the staged node was before it was staged.
    Rename {
        tmp: RelPath,
        orig: RelPath,
        to: RelPath,
        src: Entry,
    },
    /// `trusted` is the replica entry of `from` when the plan was made.
    Copy {
        from: RelPath,
        to: RelPath,
        src: Entry,
        trusted: Option<Entry>,
    },
    Write {
        path: RelPath,
        src: Entry,
        code: Code,
    },
    Symlink {
        path: RelPath,
        src: Entry,
        code: Code,
    },
    Link {
        leader: RelPath,
        path: RelPath,
        src: Entry,
        code: Code,
    },
    SetMeta {
        path: RelPath,
        src: Entry,
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
}

impl Plan {
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

/// Name prefix of every temporary node dirsync creates inside the replica.
pub const TMP_PREFIX: &str = ".dirsync-tmp-";

/// Builds the plan for `changes`. `src` and `dst` are the two trees the changes came from.
pub fn plan(
    changes: &[Change],
    src: &[(RelPath, Entry)],
    dst: &[(RelPath, Entry)],
    owners: bool,
) -> Plan {
    Planner::new(src, dst, owners).run(changes)
}

struct Planner<'a> {
    src: &'a [(RelPath, Entry)],
    dst: &'a [(RelPath, Entry)],
    owners: bool,
    next_tmp: u64,
}

/// Where a needed path's content comes from.
enum Source {
    Move(RelPath),
    /// From a replica file; with its replica entry when that is still valid at copy time.
    Copy(RelPath, Option<Entry>),
    Fresh,
}

impl<'a> Planner<'a> {
    fn new(src: &'a [(RelPath, Entry)], dst: &'a [(RelPath, Entry)], owners: bool) -> Self {
        Planner {
            src,
            dst,
            owners,
            next_tmp: 0,
        }
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

    fn run(mut self, changes: &[Change]) -> Plan {
        // Replica nodes that go away, and source nodes that must be produced.
        let mut released: Vec<(&RelPath, &Entry)> = Vec::new();
        let mut needed: Vec<(&RelPath, &Entry, Code)> = Vec::new();
        let mut metas: Vec<(&RelPath, &Entry)> = Vec::new();
        for c in changes {
            match c {
                Change::Add { path, src } => needed.push((path, src, Code::Add)),
                Change::Modify { path, src, dst } => {
                    released.push((path, dst));
                    needed.push((path, src, Code::Modify));
                }
                Change::Type { path, src, dst } => {
                    released.push((path, dst));
                    needed.push((path, src, Code::Type));
                }
                Change::Delete { path, dst } => released.push((path, dst)),
                Change::Meta { path, src, .. } => metas.push((path, src)),
            }
        }

        // Whole-directory moves: a new directory whose tree hash a vanishing one has.
        let mut dir_pool: HashMap<Hash, VecDeque<&RelPath>> = HashMap::new();
        for (path, e) in &released {
            if let Content::Dir { tree: Some(h) } = e.content
                && self.has_children(self.dst, path)
            {
                dir_pool.entry(h).or_default().push_back(path);
            }
        }
        let mut consumed: Vec<RelPath> = Vec::new(); // replica subtrees moved away whole
        let mut covered: HashSet<RelPath> = HashSet::new(); // source subtrees moved in whole
        let mut moves: Vec<(RelPath, RelPath, Entry)> = Vec::new(); // (from, to, src entry)
        let mut items = Vec::new();
        for &(path, e, _) in &needed {
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
                items.push(Item {
                    code: Code::Move,
                    path: path.clone(),
                    from: Some(from.clone()),
                });
                moves.push((from.clone(), path.clone(), e.clone()));
            }
        }
        // Every replica path that will not be where it is now, for choosing copy sources.
        let gone: HashSet<&RelPath> = released.iter().map(|(p, _)| *p).collect();
        let is_consumed = |p: &RelPath| consumed.iter().any(|c| c == p || c.is_ancestor_of(p));
        released.retain(|(p, _)| !is_consumed(p));
        needed.retain(|(p, ..)| !under_any(&covered, p) && !covered.contains(*p));

        // File moves: a needed file whose hash a vanishing file has.
        let mut file_pool: HashMap<Hash, VecDeque<&RelPath>> = HashMap::new();
        for (path, e) in &released {
            if let (Kind::File, Some(h)) = (e.kind(), e.file_hash()) {
                file_pool.entry(h).or_default().push_back(path);
            }
        }
        let mut stable: Option<HashMap<Hash, RelPath>> = None;
        let mut moved_in: HashMap<Hash, RelPath> = HashMap::new();
        let mut copies = Vec::new();
        let mut writes = Vec::new();
        let mut links = Vec::new();
        let mut bytes = 0;
        for &(path, e, code) in &needed {
            match &e.content {
                Content::File { hash, size } => {
                    if let Some(leader) = &e.link {
                        links.push(Op::Link {
                            leader: leader.clone(),
                            path: path.clone(),
                            src: e.clone(),
                            code,
                        });
                        items.push(Item {
                            code,
                            path: path.clone(),
                            from: None,
                        });
                        continue;
                    }
                    let source = match hash {
                        None => Source::Fresh,
                        Some(h) => {
                            self.find_source(h, path, &mut file_pool, &mut stable, &gone, &moved_in)
                        }
                    };
                    match source {
                        Source::Move(from) => {
                            items.push(Item {
                                code: Code::Move,
                                path: path.clone(),
                                from: Some(from.clone()),
                            });
                            if let Some(h) = hash {
                                moved_in.entry(*h).or_insert_with(|| path.clone());
                            }
                            moves.push((from, path.clone(), e.clone()));
                        }
                        Source::Copy(from, trusted) => {
                            items.push(Item {
                                code: Code::Copy,
                                path: path.clone(),
                                from: Some(from.clone()),
                            });
                            copies.push(Op::Copy {
                                trusted,
                                from,
                                to: path.clone(),
                                src: e.clone(),
                            });
                        }
                        Source::Fresh => {
                            bytes += size;
                            items.push(Item {
                                code,
                                path: path.clone(),
                                from: None,
                            });
                            writes.push(Op::Write {
                                path: path.clone(),
                                src: e.clone(),
                                code,
                            });
                        }
                    }
                }
                Content::Symlink { .. } => {
                    items.push(Item {
                        code,
                        path: path.clone(),
                        from: None,
                    });
                    writes.push(Op::Symlink {
                        path: path.clone(),
                        src: e.clone(),
                        code,
                    });
                }
                Content::Dir { .. } | Content::Special => {
                    items.push(Item {
                        code,
                        path: path.clone(),
                        from: None,
                    });
                }
            }
        }
        // A move's target was a vanishing node too (a Modify); it was staged, not removed.
        let move_sources: HashSet<RelPath> = moves.iter().map(|(f, ..)| f.clone()).collect();

        let mut ops = Vec::new();
        let mut staged = HashMap::new();
        for (from, ..) in &moves {
            let tmp = self.tmp_name();
            ops.push(Op::Stage {
                from: from.clone(),
                tmp: tmp.clone(),
            });
            staged.insert(from.clone(), tmp);
        }

        // Removals, children first. Modified files and symlinks are replaced in place.
        let mut removals: Vec<(&RelPath, Kind)> = released
            .iter()
            .filter(|(p, e)| {
                !move_sources.contains(*p)
                    && !(self.src_kind(p) == Some(e.kind()) && e.kind() != Kind::Dir)
            })
            .map(|(p, e)| (*p, e.kind()))
            .collect();
        removals.sort_by(|a, b| b.0.cmp(a.0));
        for (path, kind) in removals {
            items_delete(&mut items, path, self.src_kind(path).is_none());
            ops.push(Op::Remove {
                path: path.clone(),
                kind,
            });
        }

        for &(path, e, code) in &needed {
            if e.is_dir() {
                ops.push(Op::Mkdir {
                    path: path.clone(),
                    src: e.clone(),
                    code,
                });
            }
        }
        let mut moved_meta = Vec::new();
        for (from, to, e) in moves {
            let old = lookup(self.dst, &from).expect("a move source is in the replica");
            if !old.same_meta(&e, self.owners) && !e.is_dir() {
                moved_meta.push(Op::SetMeta {
                    path: to.clone(),
                    src: e.clone(),
                });
            }
            ops.push(Op::Rename {
                tmp: staged[&from].clone(),
                orig: from,
                to,
                src: e,
            });
        }
        ops.extend(copies);
        ops.extend(writes);
        ops.extend(links);
        ops.extend(moved_meta);
        for (path, e) in &metas {
            if !e.is_dir() {
                ops.push(Op::SetMeta {
                    path: (*path).clone(),
                    src: (*e).clone(),
                });
            }
            items.push(Item {
                code: Code::Meta,
                path: (*path).clone(),
                from: None,
            });
        }

        // Directory metadata last: every directory that was created, moved, changed, or had an
        // entry added or removed (which bumps its mtime).
        let mut dirs: HashSet<RelPath> = HashSet::new();
        for op in &ops {
            let mut touch = |p: &RelPath| {
                if let Some(parent) = p.parent() {
                    dirs.insert(parent);
                }
            };
            match op {
                Op::Stage { from, tmp } => {
                    touch(from);
                    touch(tmp);
                }
                Op::Rename { tmp, to, .. } => {
                    touch(tmp);
                    touch(to);
                    dirs.insert(to.clone());
                }
                Op::Mkdir { path, .. } => {
                    touch(path);
                    dirs.insert(path.clone());
                }
                Op::SetMeta { .. } => {}
                other => touch(other.target()),
            }
        }
        for (path, e) in &metas {
            if e.is_dir() {
                dirs.insert((*path).clone());
            }
        }
        let mut dirs: Vec<RelPath> = dirs
            .into_iter()
            .filter(|d| self.src_kind(d) == Some(Kind::Dir))
            .collect();
        dirs.sort_by(|a, b| b.cmp(a));
        for d in dirs {
            let e = lookup(self.src, &d).expect("filtered on being in the source");
            ops.push(Op::SetMeta {
                path: d,
                src: e.clone(),
            });
        }

        items.retain(|i| !i.path.is_root());
        items.sort_by(|a, b| a.path.cmp(&b.path).then(a.code.cmp(&b.code)));
        Plan {
            ops,
            items,
            bytes_to_copy: bytes,
        }
    }

    fn find_source(
        &self,
        h: &Hash,
        path: &RelPath,
        pool: &mut HashMap<Hash, VecDeque<&RelPath>>,
        stable: &mut Option<HashMap<Hash, RelPath>>,
        gone: &HashSet<&RelPath>,
        moved_in: &HashMap<Hash, RelPath>,
    ) -> Source {
        if let Some(q) = pool.get_mut(h)
            && let Some(k) = q.iter().position(|r| *r != path)
        {
            let from = q.remove(k).expect("index is in range");
            return Source::Move(from.clone());
        }
        // Built on first use: a sync with nothing new to write never pays for it.
        let stable = stable.get_or_insert_with(|| {
            let mut m = HashMap::new();
            for (p, e) in self.dst {
                if let Some(h) = e.file_hash()
                    && !gone.contains(p)
                {
                    m.entry(h).or_insert_with(|| p.clone());
                }
            }
            m
        });
        if let Some(from) = stable.get(h).filter(|f| *f != path) {
            return Source::Copy(from.clone(), lookup(self.dst, from).cloned());
        }
        match moved_in.get(h) {
            Some(from) if from != path => Source::Copy(from.clone(), None),
            _ => Source::Fresh,
        }
    }

    fn has_children(&self, tree: &[(RelPath, Entry)], path: &RelPath) -> bool {
        !path.descendants_in(tree, |x| &x.0).is_empty()
    }

    fn src_kind(&self, path: &RelPath) -> Option<Kind> {
        lookup(self.src, path).map(Entry::kind)
    }
}

fn items_delete(items: &mut Vec<Item>, path: &RelPath, deleted: bool) {
    // A type change shows as `T` from its needed side; only a plain deletion shows `D`.
    if deleted {
        items.push(Item {
            code: Code::Delete,
            path: path.clone(),
            from: None,
        });
    }
}

fn under_any(set: &HashSet<RelPath>, path: &RelPath) -> bool {
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
