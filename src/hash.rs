//! Content hashing: BLAKE3 of file bytes, read through a buffer (never mmap: a file truncated
//! while mapped kills the process with SIGBUS), and tree hashes of directories.
//!
//! A directory's tree hash covers, for each child in canonical order, its name, kind, content
//! hash (file), tree hash (directory) or target (symlink), replicated metadata and hard-link
//! leader. Equal tree hashes therefore mean equal subtrees, metadata included, except for the
//! directory's own metadata.

use std::io::{self, Read, Write};

use crate::entry::{Content, Entry, Hash, RelPath};

/// Size of the buffer used to read files for hashing and copying.
pub const BUF_SIZE: usize = 256 * 1024;

thread_local! {
    static BUF: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0; BUF_SIZE]);
}

/// Hashes everything `r` yields, writing the same bytes to `w`. Returns the hash and the count.
pub fn copy_hashing(r: &mut dyn Read, w: &mut dyn Write) -> io::Result<(Hash, u64)> {
    BUF.with(|buf| {
        let mut buf = buf.borrow_mut();
        let mut hasher = blake3::Hasher::new();
        let mut n = 0u64;
        loop {
            let k = match r.read(&mut buf) {
                Ok(0) => break,
                Ok(k) => k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            hasher.update(&buf[..k]);
            w.write_all(&buf[..k])?;
            n += k as u64;
        }
        Ok((*hasher.finalize().as_bytes(), n))
    })
}

/// Hashes everything `r` yields.
pub fn hash_reader(r: &mut dyn Read) -> io::Result<(Hash, u64)> {
    copy_hashing(r, &mut io::sink())
}

/// The hash of the empty file.
pub fn empty_hash() -> Hash {
    *blake3::hash(b"").as_bytes()
}

/// Incrementally builds a directory's tree hash from its children, given in canonical order.
/// Returns `None` when any child's content is unknown.
pub struct TreeHasher {
    h: blake3::Hasher,
    known: bool,
    owners: bool,
}

impl TreeHasher {
    pub fn new(owners: bool) -> TreeHasher {
        TreeHasher {
            h: blake3::Hasher::new(),
            known: true,
            owners,
        }
    }

    pub fn add(&mut self, name: &[u8], e: &Entry) {
        let h = &mut self.h;
        h.update(&(name.len() as u64).to_le_bytes());
        h.update(name);
        let known = match &e.content {
            Content::File { size, hash } => {
                h.update(b"f");
                h.update(&size.to_le_bytes());
                hash.map(|x| h.update(&x)).is_some()
            }
            Content::Dir { tree } => {
                h.update(b"d");
                tree.map(|x| h.update(&x)).is_some()
            }
            Content::Symlink { target } => {
                h.update(b"l");
                h.update(&(target.len() as u64).to_le_bytes());
                h.update(target);
                true
            }
            Content::Special => false,
        };
        self.known &= known;
        let m = &e.meta;
        if e.kind() != crate::entry::Kind::Symlink {
            h.update(&m.mode.to_le_bytes());
        }
        h.update(&m.mtime.sec.to_le_bytes());
        h.update(&m.mtime.nsec.to_le_bytes());
        if self.owners {
            h.update(&m.uid.to_le_bytes());
            h.update(&m.gid.to_le_bytes());
        }
        match &e.link {
            Some(l) => {
                h.update(&(l.as_bytes().len() as u64 + 1).to_le_bytes());
                h.update(l.as_bytes());
            }
            None => {
                h.update(&0u64.to_le_bytes());
            }
        }
    }

    pub fn finish(self) -> Option<Hash> {
        self.known.then(|| *self.h.finalize().as_bytes())
    }
}

/// Fills in the tree hash of every directory of a canonically sorted tree, bottom-up.
pub fn fill_tree_hashes(entries: &mut [(RelPath, Entry)], owners: bool) {
    // Children lists in canonical order, by index of the parent directory.
    let mut dir_index: std::collections::HashMap<&[u8], usize> = Default::default();
    let mut children: Vec<Vec<usize>> = vec![Vec::new(); entries.len()];
    for (i, (path, e)) in entries.iter().enumerate() {
        if let Some(parent) = path.parent()
            && let Some(&pi) = dir_index.get(parent.as_bytes())
        {
            children[pi].push(i);
        }
        if e.is_dir() {
            dir_index.insert(path.as_bytes(), i);
        }
    }
    drop(dir_index);
    // Descendants sort after their ancestors, so a reverse pass sees children first.
    for i in (0..entries.len()).rev() {
        if !entries[i].1.is_dir() {
            continue;
        }
        let mut th = TreeHasher::new(owners);
        for &c in &children[i] {
            th.add(entries[c].0.name(), &entries[c].1);
        }
        entries[i].1.content = Content::Dir { tree: th.finish() };
    }
}
