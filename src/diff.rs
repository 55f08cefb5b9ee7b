//! Pure: compares the source tree with the replica tree and lists what differs.
//!
//! Both inputs are sorted in canonical order and merged in one pass. Where a directory has the
//! same tree hash on both sides, its whole subtree is skipped on both sides without looking at
//! it (the descendants of a path are one contiguous run in canonical order).

use std::collections::HashMap;

use crate::entry::{Entry, RelPath};

/// One difference between the source and the replica. It borrows the paths and entries of the
/// two trees it was found in: an initial sync has a change for every source path, and copies of
/// them would double the memory the trees take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change<'a> {
    /// In the source only.
    Add { path: &'a RelPath, src: &'a Entry },
    /// Same kind on both sides, different content (or hard-link partner).
    Modify {
        path: &'a RelPath,
        src: &'a Entry,
        dst: &'a Entry,
    },
    /// A different kind on each side (file, directory, symlink).
    Type {
        path: &'a RelPath,
        src: &'a Entry,
        dst: &'a Entry,
    },
    /// In the replica only.
    Delete { path: &'a RelPath, dst: &'a Entry },
    /// Same content, different metadata.
    Meta {
        path: &'a RelPath,
        src: &'a Entry,
        dst: &'a Entry,
    },
}

impl<'a> Change<'a> {
    pub fn path(&self) -> &'a RelPath {
        match self {
            Change::Add { path, .. }
            | Change::Modify { path, .. }
            | Change::Type { path, .. }
            | Change::Delete { path, .. }
            | Change::Meta { path, .. } => path,
        }
    }
}

/// Diffs two canonically sorted trees. `owners` says whether uid/gid are compared. Paths for
/// which `skip` is true (unreadable in the source) produce no change.
pub fn diff<'a>(
    src: &'a [(RelPath, Entry)],
    dst: &'a [(RelPath, Entry)],
    owners: bool,
    skip: &dyn Fn(&RelPath) -> bool,
) -> Vec<Change<'a>> {
    let mut out = Vec::new();
    // Runs of descendants to jump over, by start index.
    let mut skip_src: HashMap<usize, usize> = HashMap::new();
    let mut skip_dst: HashMap<usize, usize> = HashMap::new();
    let (mut i, mut j) = (0, 0);
    loop {
        if let Some(end) = skip_src.remove(&i) {
            i = end;
            continue;
        }
        if let Some(end) = skip_dst.remove(&j) {
            j = end;
            continue;
        }
        let order = match (src.get(i), dst.get(j)) {
            (None, None) => break,
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (Some((a, _)), Some((b, _))) => a.cmp(b),
        };
        match order {
            std::cmp::Ordering::Less => {
                let (path, s) = &src[i];
                if !skip(path) {
                    out.push(Change::Add { path, src: s });
                }
                i += 1;
            }
            std::cmp::Ordering::Greater => {
                let (path, d) = &dst[j];
                if !skip(path) {
                    out.push(Change::Delete { path, dst: d });
                }
                j += 1;
            }
            std::cmp::Ordering::Equal => {
                let (path, s) = &src[i];
                let d = &dst[j].1;
                if s.is_dir() && d.is_dir() && s.same_content(d) {
                    let rs = path.descendants_in(src, |x| &x.0);
                    let rd = path.descendants_in(dst, |x| &x.0);
                    if !rs.is_empty() {
                        skip_src.insert(rs.start, rs.end);
                    }
                    if !rd.is_empty() {
                        skip_dst.insert(rd.start, rd.end);
                    }
                }
                if !skip(path)
                    && let Some(c) = compare(path, s, d, owners)
                {
                    out.push(c);
                }
                i += 1;
                j += 1;
            }
        }
    }
    out
}

fn compare<'a>(
    path: &'a RelPath,
    src: &'a Entry,
    dst: &'a Entry,
    owners: bool,
) -> Option<Change<'a>> {
    if src.kind() != dst.kind() {
        return Some(Change::Type { path, src, dst });
    }
    if !src.is_dir() && (!src.same_content(dst) || src.link != dst.link) {
        return Some(Change::Modify { path, src, dst });
    }
    if !src.same_meta(dst, owners) {
        return Some(Change::Meta { path, src, dst });
    }
    None
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::entry::{Content, Meta, Time};
    use crate::hash::fill_tree_hashes;

    pub fn p(s: &str) -> RelPath {
        RelPath::from_bytes(s.as_bytes()).unwrap()
    }

    pub fn file(content: &str, mtime: i64) -> Entry {
        Entry {
            content: Content::File {
                size: content.len() as u64,
                hash: Some(*blake3::hash(content.as_bytes()).as_bytes()),
            },
            meta: Meta {
                mode: 0o644,
                mtime: Time {
                    sec: mtime,
                    nsec: 0,
                },
                uid: 0,
                gid: 0,
            },
            fp: Default::default(),
            seen: Time::default(),
            link: None,
        }
    }

    pub fn dir() -> Entry {
        Entry {
            content: Content::Dir { tree: None },
            meta: Meta {
                mode: 0o755,
                ..Meta::default()
            },
            ..file("", 0)
        }
    }

    pub fn link(target: &str) -> Entry {
        Entry {
            content: Content::Symlink {
                target: target.as_bytes().to_vec(),
            },
            ..file("", 0)
        }
    }

    /// Builds a sorted tree with tree hashes from (path, entry) pairs; the root is added.
    pub fn tree(items: Vec<(&str, Entry)>) -> Vec<(RelPath, Entry)> {
        let mut v: Vec<(RelPath, Entry)> = items.into_iter().map(|(s, e)| (p(s), e)).collect();
        v.push((RelPath::root(), dir()));
        v.sort_by(|a, b| a.0.cmp(&b.0));
        fill_tree_hashes(&mut v, false);
        v
    }

    fn summary(changes: &[Change]) -> Vec<String> {
        changes
            .iter()
            .map(|c| {
                let k = match c {
                    Change::Add { .. } => "A",
                    Change::Modify { .. } => "M",
                    Change::Type { .. } => "T",
                    Change::Delete { .. } => "D",
                    Change::Meta { .. } => "m",
                };
                format!("{k} {}", c.path())
            })
            .collect()
    }

    fn run(src: &[(RelPath, Entry)], dst: &[(RelPath, Entry)]) -> Vec<String> {
        summary(&diff(src, dst, false, &|_| false))
    }

    #[test]
    fn identical_trees_have_no_changes() {
        let t = tree(vec![("a", dir()), ("a/x", file("1", 1)), ("b", link("a"))]);
        assert!(run(&t, &t).is_empty());
    }

    #[test]
    fn adds_modifies_deletes_and_meta() {
        let src = tree(vec![
            ("a", file("new", 1)),
            ("b", file("same", 5)),
            ("d", dir()),
        ]);
        let dst = tree(vec![
            ("a", file("old", 1)),
            ("b", file("same", 1)),
            ("c", file("x", 1)),
        ]);
        assert_eq!(run(&src, &dst), ["M a", "m b", "D c", "A d"]);
    }

    #[test]
    fn type_changes_between_file_dir_and_symlink() {
        let src = tree(vec![
            ("a", dir()),
            ("a/x", file("1", 1)),
            ("b", file("b", 1)),
            ("c", link("t")),
        ]);
        let dst = tree(vec![
            ("a", file("a", 1)),
            ("b", dir()),
            ("b/y", file("2", 1)),
            ("c", dir()),
        ]);
        assert_eq!(run(&src, &dst), ["T a", "A a/x", "T b", "D b/y", "T c"]);
    }

    #[test]
    fn equal_subtrees_are_skipped_by_tree_hash() {
        let src = tree(vec![
            ("a", dir()),
            ("a/x", file("1", 1)),
            ("a.b", file("q", 1)),
        ]);
        let mut dst = tree(vec![
            ("a", dir()),
            ("a/x", file("1", 1)),
            ("a.b", file("r", 1)),
        ]);
        // Corrupt a descendant on the replica side without changing the recorded tree hash: a
        // diff that skips the subtree cannot see it.
        let k = dst.iter().position(|(p0, _)| *p0 == p("a/x")).unwrap();
        dst[k].1 = file("zzz", 1);
        assert_eq!(run(&src, &dst), ["M a.b"]);
    }

    #[test]
    fn unreadable_paths_produce_no_changes() {
        let src = tree(vec![("a", dir())]);
        let dst = tree(vec![
            ("a", dir()),
            ("a/x", file("1", 1)),
            ("b", file("2", 1)),
        ]);
        let c = diff(&src, &dst, false, &|q| {
            q == &p("a") || p("a").is_ancestor_of(q)
        });
        assert_eq!(summary(&c), ["D b"]);
    }

    #[test]
    fn hard_link_partner_change_is_a_modify() {
        let mut x = file("1", 1);
        x.link = Some(p("a"));
        let src = tree(vec![("a", file("1", 1)), ("b", x)]);
        let dst = tree(vec![("a", file("1", 1)), ("b", file("1", 1))]);
        assert_eq!(run(&src, &dst), ["M b"]);
    }
}
