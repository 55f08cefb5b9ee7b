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

/// Files at least this large are hashed on every core.
pub const PARALLEL_HASH_MIN: u64 = 8 * 1024 * 1024;
/// Block size for large files: big enough that each `update_rayon` splits across the pool, small
/// enough that a block read is still in the cache when it is hashed.
const PARALLEL_BUF: usize = 1024 * 1024;

/// Reads until `buf` is full or `r` is at its end; returns the count.
fn fill(r: &mut (dyn Read + Send), buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(k) => filled += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Hashes everything `r` yields; `size_hint` picks the strategy. A large file is read in big
/// blocks, double-buffered: the next block is read while BLAKE3 splits the current one across
/// the rayon pool. Every byte read is hashed exactly once, in order, so the result is the hash
/// of what was read and the count says how much that was.
pub fn hash_reader(r: &mut (dyn Read + Send), size_hint: u64) -> io::Result<(Hash, u64)> {
    if size_hint < PARALLEL_HASH_MIN {
        return copy_hashing(r, &mut io::sink());
    }
    let mut cur = vec![0u8; PARALLEL_BUF];
    let mut next = vec![0u8; PARALLEL_BUF];
    let mut hasher = blake3::Hasher::new();
    let mut n = 0u64;
    let mut filled = fill(r, &mut cur)?;
    while filled > 0 {
        let block = &cur[..filled];
        let (read, ()) = rayon::join(
            || fill(r, &mut next),
            || {
                hasher.update_rayon(block);
            },
        );
        n += filled as u64;
        filled = read?;
        std::mem::swap(&mut cur, &mut next);
    }
    Ok((*hasher.finalize().as_bytes(), n))
}

/// The hash of the empty file.
pub fn empty_hash() -> Hash {
    *blake3::hash(b"").as_bytes()
}

/// Builds a directory's tree hash from its children, given in canonical order. The children's
/// records are serialized into one buffer and hashed once. Returns `None` when any child's
/// content is unknown.
pub struct TreeHasher {
    buf: Vec<u8>,
    known: bool,
    owners: bool,
}

impl TreeHasher {
    pub fn new(owners: bool) -> TreeHasher {
        TreeHasher {
            buf: Vec::new(),
            known: true,
            owners,
        }
    }

    /// Starts over for another directory, keeping the buffer.
    pub fn reset(&mut self) {
        self.buf.clear();
        self.known = true;
    }

    pub fn add(&mut self, name: &[u8], e: &Entry) {
        let b = &mut self.buf;
        b.extend_from_slice(&(name.len() as u64).to_le_bytes());
        b.extend_from_slice(name);
        let known = match &e.content {
            Content::File { size, hash } => {
                b.push(b'f');
                b.extend_from_slice(&size.to_le_bytes());
                hash.map(|x| b.extend_from_slice(&x)).is_some()
            }
            Content::Dir { tree } => {
                b.push(b'd');
                tree.map(|x| b.extend_from_slice(&x)).is_some()
            }
            Content::Symlink { target } => {
                b.push(b'l');
                b.extend_from_slice(&(target.len() as u64).to_le_bytes());
                b.extend_from_slice(target);
                true
            }
            Content::Special => false,
        };
        self.known &= known;
        let m = &e.meta;
        if e.kind() != crate::entry::Kind::Symlink {
            b.extend_from_slice(&m.mode.to_le_bytes());
        }
        b.extend_from_slice(&m.mtime.sec.to_le_bytes());
        b.extend_from_slice(&m.mtime.nsec.to_le_bytes());
        if self.owners {
            b.extend_from_slice(&m.uid.to_le_bytes());
            b.extend_from_slice(&m.gid.to_le_bytes());
        }
        match &e.link {
            Some(l) => {
                b.extend_from_slice(&(l.as_bytes().len() as u64 + 1).to_le_bytes());
                b.extend_from_slice(l.as_bytes());
            }
            None => b.extend_from_slice(&0u64.to_le_bytes()),
        }
    }

    pub fn finish(&self) -> Option<Hash> {
        self.known.then(|| *blake3::hash(&self.buf).as_bytes())
    }
}

/// Fills in the tree hash of every directory of a canonically sorted tree, bottom-up.
pub fn fill_tree_hashes(entries: &mut [(RelPath, Entry)], owners: bool) {
    const NONE: u32 = u32::MAX;
    let dirs: std::collections::HashMap<&[u8], u32> = entries
        .iter()
        .enumerate()
        .filter(|(_, (_, e))| e.is_dir())
        .map(|(i, (p, _))| (p.as_bytes(), i as u32))
        .collect();
    let parent: Vec<u32> = entries
        .iter()
        .map(|(path, _)| {
            let bytes = path.as_bytes();
            if bytes.is_empty() {
                return NONE;
            }
            let up = bytes
                .iter()
                .rposition(|&b| b == b'/')
                .map_or(&[][..], |i| &bytes[..i]);
            dirs.get(up).copied().unwrap_or(NONE)
        })
        .collect();
    drop(dirs);
    // Children of each entry in canonical order, as one flat array (CSR layout).
    let mut start = vec![0u32; entries.len() + 1];
    for &p in &parent {
        if p != NONE {
            start[p as usize + 1] += 1;
        }
    }
    for i in 0..entries.len() {
        start[i + 1] += start[i];
    }
    let mut fill = start.clone();
    let mut children = vec![0u32; start[entries.len()] as usize];
    for (i, &p) in parent.iter().enumerate() {
        if p != NONE {
            children[fill[p as usize] as usize] = i as u32;
            fill[p as usize] += 1;
        }
    }
    // Descendants sort after their ancestors, so a reverse pass sees children first.
    let mut th = TreeHasher::new(owners);
    for i in (0..entries.len()).rev() {
        if !entries[i].1.is_dir() {
            continue;
        }
        th.reset();
        for &c in &children[start[i] as usize..start[i + 1] as usize] {
            let (path, e) = &entries[c as usize];
            th.add(path.name(), e);
        }
        entries[i].1.content = Content::Dir { tree: th.finish() };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diff::tests::{dir, file, tree};

    fn root_hash(t: &[(RelPath, Entry)]) -> Option<Hash> {
        match t[0].1.content {
            Content::Dir { tree } => tree,
            _ => None,
        }
    }

    #[test]
    fn tree_hash_covers_every_level_and_ignores_other_subtrees_order() {
        let a = tree(vec![
            ("d", dir()),
            ("d/e", dir()),
            ("d/e/f", file("1", 1)),
            ("d.x", file("2", 1)),
        ]);
        let b = tree(vec![
            ("d", dir()),
            ("d/e", dir()),
            ("d/e/f", file("1", 2)),
            ("d.x", file("2", 1)),
        ]);
        let c = tree(vec![
            ("d", dir()),
            ("d/e", dir()),
            ("d/e/g", file("1", 1)),
            ("d.x", file("2", 1)),
        ]);
        assert!(root_hash(&a).is_some());
        assert_ne!(root_hash(&a), root_hash(&b), "a deep mtime counts");
        assert_ne!(root_hash(&a), root_hash(&c), "a deep name counts");
        assert_eq!(root_hash(&a), root_hash(&a.clone()));
    }

    #[test]
    fn unknown_content_makes_the_tree_hash_unknown() {
        let mut f = file("1", 1);
        f.content = Content::File {
            size: 1,
            hash: None,
        };
        let t = tree(vec![("d", dir()), ("d/f", f)]);
        assert_eq!(root_hash(&t), None);
    }

    #[test]
    fn parallel_and_serial_hashing_agree() {
        let data: Vec<u8> = (0..PARALLEL_HASH_MIN as usize + 12345)
            .map(|i| (i * 7) as u8)
            .collect();
        let (a, n) = hash_reader(&mut &data[..], data.len() as u64).unwrap();
        let (b, _) = hash_reader(&mut &data[..], 0).unwrap();
        assert_eq!(n as usize, data.len());
        assert_eq!(a, b);
        assert_eq!(a, *blake3::hash(&data).as_bytes());
    }

    /// Hands out bytes in uneven pieces, changing the data between reads, and keeps a copy of
    /// exactly what it handed out.
    struct Shifty {
        given: Vec<u8>,
        reads: usize,
        limit: usize,
        fail_at: Option<usize>,
    }

    impl Read for Shifty {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.reads += 1;
            if Some(self.reads) == self.fail_at {
                return Err(io::Error::other("device gone"));
            }
            if self.reads % 7 == 3 {
                return Err(io::ErrorKind::Interrupted.into());
            }
            let left = self.limit - self.given.len();
            let k = buf.len().min(left).min(1 + (self.reads * 7919) % 300_000);
            for (i, b) in buf[..k].iter_mut().enumerate() {
                *b = (self.reads as u8).wrapping_mul(31) ^ (i as u8);
            }
            self.given.extend_from_slice(&buf[..k]);
            Ok(k)
        }
    }

    #[test]
    fn large_hash_covers_exactly_the_bytes_read_whatever_the_read_sizes() {
        for limit in [
            PARALLEL_BUF - 1,
            PARALLEL_BUF,
            PARALLEL_BUF + 1,
            3 * PARALLEL_BUF + 12345,
        ] {
            let mut r = Shifty {
                given: Vec::new(),
                reads: 0,
                limit,
                fail_at: None,
            };
            let (h, n) = hash_reader(&mut r, PARALLEL_HASH_MIN).unwrap();
            assert_eq!(n as usize, limit);
            assert_eq!(r.given.len(), limit);
            assert_eq!(h, *blake3::hash(&r.given).as_bytes());
        }
    }

    #[test]
    fn large_hash_reports_a_read_error() {
        let mut r = Shifty {
            given: Vec::new(),
            reads: 0,
            limit: 4 * PARALLEL_BUF,
            fail_at: Some(10),
        };
        let e = hash_reader(&mut r, PARALLEL_HASH_MIN).unwrap_err();
        assert_eq!(e.to_string(), "device gone");
    }

    #[test]
    fn large_file_growing_while_hashed_gets_the_hash_of_what_was_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big");
        let block: Vec<u8> = (0..PARALLEL_BUF).map(|i| (i * 13 + 5) as u8).collect();
        let mut f = std::fs::File::create(&path).unwrap();
        for _ in 0..(PARALLEL_HASH_MIN as usize / PARALLEL_BUF + 2) {
            f.write_all(&block).unwrap();
        }
        let start = f.metadata().unwrap().len();
        let stop = std::sync::atomic::AtomicBool::new(false);
        let (h, n) = std::thread::scope(|s| {
            s.spawn(|| {
                let mut w = std::fs::OpenOptions::new()
                    .append(true)
                    .open(&path)
                    .unwrap();
                for i in 0..64u8 {
                    if stop.load(std::sync::atomic::Ordering::Relaxed) {
                        break;
                    }
                    w.write_all(&[i; 100_003]).unwrap();
                }
            });
            let mut r = std::fs::File::open(&path).unwrap();
            let out = hash_reader(&mut r, start).unwrap();
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            out
        });
        let all = std::fs::read(&path).unwrap();
        assert!(n >= start && n as usize <= all.len());
        assert_eq!(h, *blake3::hash(&all[..n as usize]).as_bytes());
    }

    #[test]
    fn copy_hashing_hashes_what_it_copies() {
        let data = vec![7u8; BUF_SIZE * 2 + 3];
        let mut out = Vec::new();
        let (h, n) = copy_hashing(&mut &data[..], &mut out).unwrap();
        assert_eq!(n as usize, data.len());
        assert_eq!(out, data);
        assert_eq!(h, *blake3::hash(&data).as_bytes());
    }
}
