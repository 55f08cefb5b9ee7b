//! The persistent index, and the only module that uses redb.
//!
//! Schema (version [`SCHEMA`]), all keys and values are bytes:
//! - `meta`: `"schema"` -> u32 little endian; `"source"` and `"replica"` -> the canonical root
//!   paths the index was made for. The index belongs to its replica: another replica is
//!   refused; another source clears the `source` table only ([`Index::adopt_source`]). An index
//!   without a `"replica"` row (written before it was checked) is taken as the given replica's.
//!   [`FS_TRAITS`] -> what the replica's filesystem keeps (timestamp grain, case), probed by the
//!   first sync; an index without it gets it then.
//! - `source`: relative path -> postcard [`Entry`]: the source tree as last scanned, a cache of
//!   hashes keyed by the backend's [`Stamp`](crate::entry::Stamp).
//! - `replica`: relative path -> postcard [`Entry`]: what the replica holds, as last written or
//!   verified by dirsync, with the replica node's own stamp.
//!
//! In an [`Entry`] value, time, metadata and hashes are fixed-width byte strings, and the stamp
//! is one byte string led by its variant's tag (0 POSIX: size, mtime, ctime, inode, device;
//! 1 seconds: size, mtime; 2 object: size, ETag hash), so decoding a record stays a handful of
//! length checks (a no-op pass reads every record).
//!
//! Schema history: 2 stored the stamp as the untagged POSIX fields (48 bytes). A writer
//! ([`Index::open`]) migrates a schema-2 index when it opens it: every record is rewritten with
//! the same values as a `Stamp::Posix`, in the one write transaction that sets the schema to 3,
//! so the migration happens whole or not at all and rehashes nothing. A reader ([`ReadIndex`],
//! `status`) never writes: it decodes schema-2 records as they are. A schema newer than
//! [`SCHEMA`] is refused ([`Error::IndexTooNew`]); one older than [`OLDEST_SCHEMA`] reads as
//! damaged, and `--reindex` rebuilds it.
//!
//! Keys are [`RelPath`] bytes, so redb's order is the canonical order. Every value read back is
//! validated (path and encoding) before use; an index that fails validation is reported as
//! damaged, never trusted. One process writes at a time (redb's `SingleWriter` mode, enforced
//! with file locks); readers such as `status` open the file read-only alongside it.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use redb::{
    ConcurrencyMode, Database, DatabaseError, Durability, ReadTransaction, ReadableDatabase,
    ReadableTable, ReadableTableMetadata, TableDefinition,
};

use crate::entry::{Entry, Hash, RelPath};
use crate::error::{Error, Result};
use std::ops::Bound;

/// Version of the table layout and value encoding.
pub const SCHEMA: u32 = 3;

/// The oldest schema this dirsync reads: a writer migrates it to [`SCHEMA`] when it opens it,
/// a reader decodes it as it is.
pub const OLDEST_SCHEMA: u32 = 2;

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const SOURCE: TableDefinition<&[u8], &[u8]> = TableDefinition::new("source");
const REPLICA: TableDefinition<&[u8], &[u8]> = TableDefinition::new("replica");

/// Which recorded tree a table holds.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Table {
    Source,
    Replica,
}

impl Table {
    fn def(self) -> TableDefinition<'static, &'static [u8], &'static [u8]> {
        match self {
            Table::Source => SOURCE,
            Table::Replica => REPLICA,
        }
    }
}

/// One change to the recorded trees.
#[derive(Clone, Debug)]
pub enum Update {
    Put(Table, RelPath, Entry),
    /// Removes a path and everything below it.
    Remove(Table, RelPath),
    /// Removes the record of exactly this path.
    Forget(Table, RelPath),
    /// Moves a path and everything below it to a new path, keeping the entries.
    Move(Table, RelPath, RelPath),
}

/// The index opened for writing; holds the single-writer lock until dropped.
pub struct Index {
    db: Database,
    path: PathBuf,
}

/// The roots an index belongs to.
pub struct Roots<'a> {
    pub source: &'a Path,
    pub replica: &'a Path,
}

fn builder() -> redb::Builder {
    let mut b = Database::builder();
    b.set_concurrency_mode(ConcurrencyMode::SingleWriter);
    b.set_cache_size(4 * 1024 * 1024);
    b
}

/// Maps any redb error to the user's terms: a full disk, another I/O failure, a lock, or a
/// damaged file.
fn ierr(path: &Path, e: impl Into<redb::Error>) -> Error {
    match e.into() {
        redb::Error::Io(io) => io_failure(path, io),
        redb::Error::DatabaseAlreadyOpen => Error::IndexLocked {
            path: path.to_path_buf(),
        },
        other => damaged(path, other),
    }
}

fn io_failure(path: &Path, io: std::io::Error) -> Error {
    let code = io.raw_os_error();
    if code == Some(rustix::io::Errno::NOSPC.raw_os_error())
        || code == Some(rustix::io::Errno::DQUOT.raw_os_error())
    {
        return Error::IndexFull {
            path: path.to_path_buf(),
        };
    }
    match io.kind() {
        // What redb reports for a file that is not a redb database, or a cut-off one.
        std::io::ErrorKind::InvalidData | std::io::ErrorKind::UnexpectedEof => damaged(path, io),
        _ => Error::io(path, io),
    }
}

/// Runs an index operation, turning a panic inside redb (which some damaged files cause) into
/// a damaged-index error. The default panic message is not printed.
fn guarded<T>(path: &Path, f: impl FnOnce() -> Result<T>) -> Result<T> {
    use std::panic;
    static QUIET: std::sync::Once = std::sync::Once::new();
    QUIET.call_once(|| {
        let default = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if !IN_INDEX.with(|c| c.get()) {
                default(info);
            }
        }));
    });
    IN_INDEX.with(|c| c.set(true));
    let r = panic::catch_unwind(panic::AssertUnwindSafe(f));
    IN_INDEX.with(|c| c.set(false));
    r.unwrap_or_else(|p| {
        let why = p
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "its structure is inconsistent".into());
        Err(damaged(path, format!("internal inconsistency: {why}")))
    })
}

thread_local! {
    static IN_INDEX: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn damaged(path: &Path, why: impl std::fmt::Display) -> Error {
    Error::IndexDamaged {
        path: path.to_path_buf(),
        why: why.to_string(),
    }
}

/// Creates the index at `path` if there is none (or only an empty file): a fresh database is
/// initialised under a temporary name beside it and renamed into place, so that a crash while
/// it is created leaves no half-written index, only a temporary that a later creation removes.
fn create_whole(path: &Path, roots: &Roots) -> Result<()> {
    let replace = match std::fs::symlink_metadata(path) {
        Ok(md) if md.len() > 0 || !md.is_file() => return Ok(()),
        Ok(_) => true,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => return Err(Error::io(path, e)),
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    let prefix = format!(
        "{}.new-",
        path.file_name().unwrap_or_default().to_string_lossy()
    );
    remove_dead_temporaries(dir, &prefix);
    let tmp = dir.join(format!("{prefix}{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let made = guarded(&tmp, || {
        let db = builder().create(&tmp).map_err(|e| ierr(&tmp, e))?;
        Index {
            db,
            path: tmp.clone(),
        }
        .init(roots, false)
    });
    let placed = made.and_then(|()| {
        use rustix::fs::{CWD, RenameFlags, renameat_with};
        let flags = if replace {
            RenameFlags::empty()
        } else {
            RenameFlags::NOREPLACE
        };
        match renameat_with(CWD, &tmp, CWD, path, flags) {
            // Another process created it meanwhile: theirs is used.
            Ok(()) | Err(rustix::io::Errno::EXIST) => Ok(()),
            // A file system without RENAME_NOREPLACE.
            Err(rustix::io::Errno::INVAL | rustix::io::Errno::NOSYS) => {
                std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
            }
            Err(e) => Err(Error::io(path, e.into())),
        }
    });
    let _ = std::fs::remove_file(&tmp);
    placed?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Removes temporaries of [`create_whole`] whose creating process no longer runs.
fn remove_dead_temporaries(dir: &Path, prefix: &str) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let pid = name
            .to_str()
            .and_then(|n| n.strip_prefix(prefix))
            .and_then(|n| n.parse::<i32>().ok())
            .and_then(rustix::process::Pid::from_raw);
        let Some(pid) = pid else { continue };
        if rustix::process::test_kill_process(pid) == Err(rustix::io::Errno::SRCH) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

impl Index {
    /// Opens or creates the index at `path` for the given roots. With `reindex`, whatever the
    /// file holds is discarded first (the next scans rebuild it from the two trees).
    pub fn open(path: &Path, roots: &Roots, reindex: bool) -> Result<Index> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        let open = || {
            create_whole(path, roots)?;
            guarded(path, || {
                let db = builder().create(path).map_err(|e| ierr(path, e))?;
                let index = Index {
                    db,
                    path: path.to_path_buf(),
                };
                index.init(roots, reindex)?;
                index.adopt_source_unguarded(roots.source)?;
                Ok(index)
            })
        };
        match open() {
            Err(Error::IndexDamaged { .. }) if reindex => {
                log::warn!("discarding the unreadable index {}", path.display());
                std::fs::remove_file(path).map_err(|e| Error::io(path, e))?;
                open()
            }
            other => other,
        }
    }

    /// Opens the index at `path` for the given roots only if there is one, creating and writing
    /// nothing: `None` when the file does not exist, is empty, or has no dirsync schema yet.
    pub fn open_existing(path: &Path, roots: &Roots) -> Result<Option<Index>> {
        match std::fs::metadata(path) {
            Ok(md) if md.len() > 0 => {}
            Ok(_) => return Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(path, e)),
        }
        guarded(path, || {
            let db = builder().open(path).map_err(|e| ierr(path, e))?;
            let index = Index {
                db,
                path: path.to_path_buf(),
            };
            if !index.has_schema()? {
                return Ok(None);
            }
            // With a schema in place, this only reads (or migrates an older schema).
            index.init(roots, false)?;
            Ok(Some(index))
        })
    }

    fn has_schema(&self) -> Result<bool> {
        let p = &self.path;
        let tx = self.db.begin_read().map_err(|e| ierr(p, e))?;
        let meta = match tx.open_table(META) {
            Ok(m) => m,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(false),
            Err(e) => return Err(ierr(p, e)),
        };
        Ok(meta.get("schema").map_err(|e| ierr(p, e))?.is_some())
    }

    /// Checks what the file holds against the roots and, for a new file or with `reset`, makes
    /// it an empty index of these roots. An index of an older schema is migrated, in the same
    /// transaction that sets the new schema. An index in use is otherwise only read here unless
    /// its replica was never recorded (then it is recorded now): opening it writes nothing, so a
    /// full disk under the index does not stop a sync before it starts.
    fn init(&self, roots: &Roots, reset: bool) -> Result<()> {
        let p = &self.path;
        let tx = self.db.begin_write().map_err(|e| ierr(p, e))?;
        let (fresh, replica_known, migrate) = {
            let meta = tx.open_table(META).map_err(|e| ierr(p, e))?;
            let schema = meta.get("schema").map_err(|e| ierr(p, e))?;
            let fresh = schema.is_none();
            if fresh {
                let ours = ["meta", "source", "replica"];
                let foreign = tx
                    .list_tables()
                    .map_err(|e| ierr(p, e))?
                    .any(|t| !ours.contains(&redb::TableHandle::name(&t)));
                if foreign {
                    return Err(Error::NotAnIndex { path: p.clone() });
                }
            }
            let version = match (&schema, reset) {
                (Some(v), false) => Some(readable_schema(p, v.value())?),
                _ => None,
            };
            let recorded = meta.get("replica").map_err(|e| ierr(p, e))?;
            let recorded = recorded.map(|v| v.value().to_vec());
            if !fresh && !reset {
                check_replica(p, recorded.as_deref(), roots.replica)?;
            }
            (
                fresh,
                recorded.is_some(),
                version.is_some_and(|v| v < SCHEMA),
            )
        };
        if !fresh && !reset && replica_known && !migrate {
            tx.abort().map_err(|e| ierr(p, e))?;
            return Ok(());
        }
        if migrate {
            // A migration rewrites every record in one transaction: the file needs room for a
            // second copy of its records. Without that room it is refused before anything is
            // written (a failed migration would leave the file grown to fill the disk).
            check_room_to_migrate(p)?;
            let n = migrate_records(p, &tx)?;
            log::info!(
                "index {} migrated to schema {SCHEMA} ({n} records, nothing rehashed)",
                p.display()
            );
        }
        if reset {
            for t in [SOURCE, REPLICA] {
                tx.delete_table(t).map_err(|e| ierr(p, e))?;
            }
        }
        {
            let mut meta = tx.open_table(META).map_err(|e| ierr(p, e))?;
            let mut ins = |k: &str, v: &[u8]| meta.insert(k, v).map(|_| ()).map_err(|e| ierr(p, e));
            ins("schema", &SCHEMA.to_le_bytes())?;
            ins("replica", roots.replica.as_os_str().as_encoded_bytes())?;
            // An index in use keeps its recorded source: `adopt_source` compares it.
            if fresh || reset {
                ins("source", roots.source.as_os_str().as_encoded_bytes())?;
            }
            // A rebuilt index probes the replica's filesystem again (it may be another one now).
            if reset {
                meta.remove(FS_TRAITS).map_err(|e| ierr(p, e))?;
            }
        }
        tx.open_table(SOURCE).map_err(|e| ierr(p, e))?;
        tx.open_table(REPLICA).map_err(|e| ierr(p, e))?;
        tx.commit().map_err(|e| ierr(p, e))?;
        Ok(())
    }

    /// Makes `source` the source this index mirrors. The index belongs to its replica: when the
    /// source differs from the recorded one (a `current -> r1` link moved to `r2`), only the
    /// `source` table, a hash cache of the old source, is cleared; the `replica` table still
    /// describes the replica and is kept. Writes nothing when the source is unchanged.
    pub fn adopt_source(&self, source: &Path) -> Result<()> {
        guarded(&self.path, || self.adopt_source_unguarded(source))
    }

    fn adopt_source_unguarded(&self, source: &Path) -> Result<()> {
        let p = &self.path;
        let given = source.as_os_str().as_encoded_bytes();
        let recorded = {
            let tx = self.db.begin_read().map_err(|e| ierr(p, e))?;
            let meta = tx.open_table(META).map_err(|e| ierr(p, e))?;
            let v = meta.get("source").map_err(|e| ierr(p, e))?;
            v.map(|v| v.value().to_vec())
        };
        if recorded.as_deref() == Some(given) {
            return Ok(());
        }
        let mut tx = self.db.begin_write().map_err(|e| ierr(p, e))?;
        tx.set_durability(Durability::Immediate)
            .map_err(|e| ierr(p, e))?;
        tx.delete_table(SOURCE).map_err(|e| ierr(p, e))?;
        tx.open_table(SOURCE).map_err(|e| ierr(p, e))?;
        {
            let mut meta = tx.open_table(META).map_err(|e| ierr(p, e))?;
            meta.insert("source", given).map_err(|e| ierr(p, e))?;
        }
        tx.commit().map_err(|e| ierr(p, e))?;
        log::info!(
            "source changed from {} to {}; its hash cache was reset (the index {} keeps what it \
             knows of the replica)",
            String::from_utf8_lossy(recorded.as_deref().unwrap_or_default()),
            source.display(),
            p.display()
        );
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What the `meta` table holds under `key` (see [`FS_TRAITS`]).
    pub fn meta_value(&self, key: &str) -> Result<Option<Vec<u8>>> {
        guarded(&self.path, || {
            let tx = self.db.begin_read().map_err(|e| ierr(&self.path, e))?;
            read_meta(&self.path, &tx, key)
        })
    }

    /// Records `value` under `key` in the `meta` table, durably.
    pub fn set_meta_value(&self, key: &str, value: &[u8]) -> Result<()> {
        let p = &self.path;
        guarded(p, || {
            let mut tx = self.db.begin_write().map_err(|e| ierr(p, e))?;
            tx.set_durability(Durability::Immediate)
                .map_err(|e| ierr(p, e))?;
            tx.open_table(META)
                .map_err(|e| ierr(p, e))?
                .insert(key, value)
                .map_err(|e| ierr(p, e))?;
            tx.commit().map_err(|e| ierr(p, e))
        })
    }

    /// Reads one recorded tree, in canonical order.
    pub fn load(&self, table: Table) -> Result<Vec<(RelPath, Entry)>> {
        guarded(&self.path, || {
            let tx = self.db.begin_read().map_err(|e| ierr(&self.path, e))?;
            load_from(&self.path, &tx, table)
        })
    }

    /// A consistent view of both recorded tables, for one pass's reads.
    pub fn snapshot(&self) -> Result<Snapshot> {
        guarded(&self.path, || {
            let tx = self.db.begin_read().map_err(|e| ierr(&self.path, e))?;
            Ok(Snapshot {
                path: self.path.clone(),
                tx: Some(tx),
                source_cached: true,
                schema: SCHEMA,
            })
        })
    }

    /// Applies a batch of updates in one durable transaction.
    pub fn commit(&self, updates: &[Update]) -> Result<()> {
        if updates.is_empty() {
            return Ok(());
        }
        guarded(&self.path, || self.commit_unguarded(updates))
    }

    fn commit_unguarded(&self, updates: &[Update]) -> Result<()> {
        let p = &self.path;
        let mut tx = self.db.begin_write().map_err(|e| ierr(p, e))?;
        tx.set_durability(Durability::Immediate)
            .map_err(|e| ierr(p, e))?;
        {
            let mut src = tx.open_table(SOURCE).map_err(|e| ierr(p, e))?;
            let mut dst = tx.open_table(REPLICA).map_err(|e| ierr(p, e))?;
            for u in updates {
                let table = match u {
                    Update::Put(t, ..)
                    | Update::Remove(t, ..)
                    | Update::Forget(t, ..)
                    | Update::Move(t, ..) => *t,
                };
                let tbl = match table {
                    Table::Source => &mut src,
                    Table::Replica => &mut dst,
                };
                apply_update(tbl, u).map_err(|e| ierr(p, e))?;
            }
        }
        tx.commit().map_err(|e| ierr(p, e))?;
        Ok(())
    }
}

fn apply_update(
    tbl: &mut redb::Table<&[u8], &[u8]>,
    u: &Update,
) -> std::result::Result<(), redb::Error> {
    match u {
        Update::Put(_, path, entry) => {
            let v = encode(entry);
            tbl.insert(path.as_bytes(), &v[..])?;
        }
        Update::Forget(_, path) => {
            tbl.remove(path.as_bytes())?;
        }
        Update::Remove(_, path) => {
            tbl.remove(path.as_bytes())?;
            for item in extract_subtree(tbl, path)? {
                item?;
            }
        }
        Update::Move(_, from, to) => {
            let mut moved = Vec::new();
            if let Some(v) = tbl.remove(from.as_bytes())? {
                moved.push((to.as_bytes().to_vec(), v.value().to_vec()));
            }
            for item in extract_subtree(tbl, from)? {
                let (k, v) = item?;
                let rel = RelPath::from_bytes(k.value())
                    .map_err(|e| redb::Error::Corrupted(e.to_string()))?;
                moved.push((rel.rebase(from, to).as_bytes().to_vec(), v.value().to_vec()));
            }
            // Rebasing keeps the order, so the inserts go in key order.
            for (k, v) in moved {
                tbl.insert(&k[..], &v[..])?;
            }
        }
    }
    Ok(())
}

type Extracted<'t> = redb::ExtractIf<'t, &'static [u8], &'static [u8], fn(&[u8], &[u8]) -> bool>;

/// Removes the records strictly below `path` in one pass over their key range; they are removed
/// as the returned iterator yields them.
fn extract_subtree<'t>(
    tbl: &'t mut redb::Table<&'static [u8], &'static [u8]>,
    path: &RelPath,
) -> std::result::Result<Extracted<'t>, redb::Error> {
    let all: fn(&[u8], &[u8]) -> bool = |_, _| true;
    let below_root: fn(&[u8], &[u8]) -> bool = |k, _| !k.is_empty();
    if path.is_root() {
        return Ok(tbl.extract_from_if::<&[u8], _>(.., below_root)?);
    }
    let mut lo = path.as_bytes().to_vec();
    lo.push(b'/');
    let mut hi = path.as_bytes().to_vec();
    hi.push(b'/' + 1);
    Ok(tbl.extract_from_if::<&[u8], _>(lo.as_slice()..hi.as_slice(), all)?)
}

fn encode(e: &Entry) -> Vec<u8> {
    postcard::to_stdvec(e).expect("entries always encode")
}

/// Decodes one recorded value written with index schema `schema` (one this dirsync reads),
/// validating the path it may name (its hard-link leader).
fn decode(path: &Path, key: &[u8], value: &[u8], schema: u32) -> Result<Entry> {
    let decoded = match schema {
        SCHEMA => postcard::from_bytes::<Entry>(value),
        _ => postcard::from_bytes::<v2::Entry>(value).map(Entry::from),
    };
    let entry = decoded
        .map_err(|e| damaged(path, format!("entry {}: {e}", String::from_utf8_lossy(key))))?;
    if let Some(l) = &entry.link {
        RelPath::from_bytes(l.as_bytes()).map_err(|e| damaged(path, e))?;
    }
    Ok(entry)
}

fn load_from(path: &Path, tx: &ReadTransaction, table: Table) -> Result<Vec<(RelPath, Entry)>> {
    let tbl = match tx.open_table(table.def()) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
        Err(e) => return Err(damaged(path, e)),
    };
    let mut out = Vec::with_capacity(tbl.len().unwrap_or(0) as usize);
    for item in tbl.iter().map_err(|e| ierr(path, e))? {
        let (k, v) = item.map_err(|e| ierr(path, e))?;
        let rel = RelPath::from_bytes(k.value()).map_err(|e| damaged(path, e))?;
        let entry = decode(path, k.value(), v.value(), SCHEMA)?;
        out.push((rel, entry));
    }
    Ok(out)
}

/// The schema recorded in `meta` as `raw`, if this dirsync reads it. A newer one is refused
/// as such; an older one than [`OLDEST_SCHEMA`] is unreadable (a rebuild makes a new one).
fn readable_schema(path: &Path, raw: &[u8]) -> Result<u32> {
    let version = <[u8; 4]>::try_from(raw).map(u32::from_le_bytes).ok();
    match version {
        Some(v @ OLDEST_SCHEMA..=SCHEMA) => Ok(v),
        Some(found) if found > SCHEMA => Err(Error::IndexTooNew {
            path: path.to_path_buf(),
            found,
            oldest: OLDEST_SCHEMA,
            known: SCHEMA,
        }),
        _ => Err(damaged(
            path,
            format!(
                "it was written with index schema {}, older than any this dirsync reads \
                 ({OLDEST_SCHEMA} to {SCHEMA})",
                version.map_or("?".to_string(), |v| v.to_string())
            ),
        )),
    }
}

/// Rewrites every record of an index of an older schema in the encoding of [`SCHEMA`], inside
/// the caller's write transaction, so that the migration commits whole with the new schema or
/// not at all. A schema-2 stamp becomes `Stamp::Posix` with the same values: every hash stays
/// valid, nothing is read again. Returns the number of records rewritten.
fn migrate_records(path: &Path, tx: &redb::WriteTransaction) -> Result<u64> {
    let mut n = 0;
    for t in [SOURCE, REPLICA] {
        let mut tbl = tx.open_table(t).map_err(|e| ierr(path, e))?;
        n += migrate_table(path, &mut tbl)?;
    }
    Ok(n)
}

/// Fails unless the filesystem of the index at `path` has room for twice the file's size (what
/// one transaction that rewrites every record can need), plus 16 MiB.
fn check_room_to_migrate(path: &Path) -> Result<()> {
    let used = std::fs::metadata(path)
        .map_err(|e| Error::io(path, e))?
        .len();
    let need = used.saturating_mul(2).saturating_add(16 << 20);
    let fd = rustix::fs::open(
        path,
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .map_err(|e| Error::io(path, e.into()))?;
    let vfs = rustix::fs::fstatvfs(&fd).map_err(|e| Error::io(path, e.into()))?;
    let free = vfs.f_bavail.saturating_mul(vfs.f_frsize);
    if free >= need {
        return Ok(());
    }
    Err(Error::Refused {
        msg: format!(
            "index {} is of an older schema and must be migrated, which needs {} MiB free on its \
             filesystem ({} MiB are); nothing was changed: free some space, or copy the index to \
             a filesystem with room and pass --index",
            path.display(),
            need >> 20,
            free >> 20
        ),
    })
}

/// [`migrate_records`] for one table, in batches of keys: memory stays bounded however many
/// records the table holds.
fn migrate_table(path: &Path, tbl: &mut redb::Table<&[u8], &[u8]>) -> Result<u64> {
    const BATCH: usize = 4096;
    let mut after: Option<Vec<u8>> = None;
    let mut n = 0;
    loop {
        let mut batch = Vec::with_capacity(BATCH);
        {
            let from = after.as_deref().map_or(Bound::Unbounded, Bound::Excluded);
            let range = tbl
                .range::<&[u8]>((from, Bound::Unbounded))
                .map_err(|e| ierr(path, e))?;
            for item in range.take(BATCH) {
                let (k, v) = item.map_err(|e| ierr(path, e))?;
                RelPath::from_bytes(k.value()).map_err(|e| damaged(path, e))?;
                let entry = decode(path, k.value(), v.value(), OLDEST_SCHEMA)?;
                batch.push((k.value().to_vec(), encode(&entry)));
            }
        }
        for (k, v) in &batch {
            tbl.insert(&k[..], &v[..]).map_err(|e| ierr(path, e))?;
        }
        n += batch.len() as u64;
        if batch.len() < BATCH {
            return Ok(n);
        }
        after = batch.pop().map(|(k, _)| k);
    }
}

/// The value encoding of index schema 2: an [`Entry`] whose stamp is an untagged POSIX record
/// ([`crate::entry::PosixV2`]); everything else is encoded as in the current schema.
mod v2 {
    use crate::entry::{Content, Meta, PosixV2, RelPath, Time};
    use serde::Deserialize;

    #[derive(Deserialize)]
    #[cfg_attr(test, derive(serde::Serialize))]
    pub struct Entry {
        pub content: Content,
        pub meta: Meta,
        pub fp: PosixV2,
        pub seen: Time,
        pub link: Option<RelPath>,
    }

    impl From<Entry> for crate::entry::Entry {
        fn from(e: Entry) -> Self {
            crate::entry::Entry {
                content: e.content,
                meta: e.meta,
                fp: e.fp.0,
                seen: e.seen,
                link: e.link,
            }
        }
    }
}

/// The `meta` key under which what the replica's filesystem keeps is recorded (the encoding of
/// `replica::probe::FsTraits`), once, the first time a sync writes to the replica.
pub const FS_TRAITS: &str = "replica_fs";

fn read_meta(path: &Path, tx: &ReadTransaction, key: &str) -> Result<Option<Vec<u8>>> {
    let meta = match tx.open_table(META) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
        Err(e) => return Err(damaged(path, e)),
    };
    let v = meta.get(key).map_err(|e| ierr(path, e))?;
    Ok(v.map(|v| v.value().to_vec()))
}

/// Refuses an index recorded for another replica. An index from before replicas were checked
/// has none recorded, and is taken as this replica's.
fn check_replica(path: &Path, recorded: Option<&[u8]>, replica: &Path) -> Result<()> {
    match recorded {
        Some(r) if r != replica.as_os_str().as_encoded_bytes() => Err(Error::IndexMismatch {
            path: path.to_path_buf(),
            recorded: String::from_utf8_lossy(r).into_owned(),
            given: replica.display().to_string(),
        }),
        _ => Ok(()),
    }
}

/// What a read-only opener learns of an index: whether its `source` table is a hash cache of
/// this source (a sync would clear it, see [`Index::adopt_source`]), and the schema its records
/// are encoded in (an older one is read as it is: a reader never migrates).
struct Checked {
    source_cached: bool,
    schema: u32,
}

/// Checks a read-only index's schema and replica, as `Index::init` does for a writer.
fn check_read_only(path: &Path, db: &redb::ReadOnlyDatabase, roots: &Roots) -> Result<Checked> {
    let tx = db.begin_read().map_err(|e| ierr(path, e))?;
    let meta = match tx.open_table(META) {
        Ok(m) => m,
        Err(redb::TableError::TableDoesNotExist(_)) => {
            let tables = tx.list_tables().map_err(|e| ierr(path, e))?;
            if tables.count() > 0 {
                return Err(Error::NotAnIndex {
                    path: path.to_path_buf(),
                });
            }
            return Ok(Checked {
                source_cached: true,
                schema: SCHEMA,
            });
        }
        Err(e) => return Err(ierr(path, e)),
    };
    let schema = meta.get("schema").map_err(|e| ierr(path, e))?;
    let schema = match schema {
        Some(v) => readable_schema(path, v.value())?,
        None => return Err(damaged(path, "it records no index schema")),
    };
    let replica = meta.get("replica").map_err(|e| ierr(path, e))?;
    check_replica(path, replica.as_ref().map(|v| v.value()), roots.replica)?;
    let source = meta.get("source").map_err(|e| ierr(path, e))?;
    let source_cached =
        source.is_some_and(|v| v.value() == roots.source.as_os_str().as_encoded_bytes());
    Ok(Checked {
        source_cached,
        schema,
    })
}

/// A read-only view of an index, for commands that must not write (`status`). A missing index
/// reads as empty.
pub struct ReadIndex {
    path: PathBuf,
    db: Option<redb::ReadOnlyDatabase>,
    /// False when the index was made with another source: its `source` table is not read.
    source_cached: bool,
    /// The schema of its records: [`SCHEMA`], or an older one read as it is.
    schema: u32,
}

impl ReadIndex {
    /// Opens the index read-only. A missing or empty file (a crash right after it was created)
    /// reads as an index with nothing recorded, as `sync` would treat it.
    pub fn open(path: &Path, roots: &Roots) -> Result<ReadIndex> {
        let empty = match std::fs::metadata(path) {
            Ok(md) => md.len() == 0,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
            Err(e) => return Err(Error::io(path, e)),
        };
        if empty {
            return Ok(ReadIndex::empty(path));
        }
        guarded(path, || {
            let db = builder().open_read_only(path).map_err(|e| match e {
                DatabaseError::RepairAborted => Error::IndexNeedsRepair {
                    path: path.to_path_buf(),
                },
                other => ierr(path, other),
            })?;
            let checked = check_read_only(path, &db, roots)?;
            Ok(ReadIndex {
                path: path.to_path_buf(),
                db: Some(db),
                source_cached: checked.source_cached,
                schema: checked.schema,
            })
        })
    }

    /// An index with nothing recorded, without reading `path` (`sync --dry-run --reindex`).
    pub fn empty(path: &Path) -> ReadIndex {
        ReadIndex {
            path: path.to_path_buf(),
            db: None,
            source_cached: true,
            schema: SCHEMA,
        }
    }

    /// See [`Index::meta_value`]; a missing index has nothing recorded.
    pub fn meta_value(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let Some(db) = &self.db else { return Ok(None) };
        guarded(&self.path, || {
            let tx = db.begin_read().map_err(|e| ierr(&self.path, e))?;
            read_meta(&self.path, &tx, key)
        })
    }

    /// Opens the index read-only only if there is one: `None` when the file does not exist, is
    /// empty, or has no dirsync schema yet.
    pub fn open_existing(path: &Path, roots: &Roots) -> Result<Option<ReadIndex>> {
        let index = ReadIndex::open(path, roots)?;
        let Some(db) = &index.db else {
            return Ok(None);
        };
        let has_schema = guarded(path, || {
            let tx = db.begin_read().map_err(|e| ierr(path, e))?;
            match tx.open_table(META) {
                Ok(m) => Ok(m.get("schema").map_err(|e| ierr(path, e))?.is_some()),
                Err(redb::TableError::TableDoesNotExist(_)) => Ok(false),
                Err(e) => Err(ierr(path, e)),
            }
        })?;
        Ok(has_schema.then_some(index))
    }

    /// Reads one recorded tree, in canonical order.
    pub fn load(&self, table: Table) -> Result<Vec<(RelPath, Entry)>> {
        let mut out = Vec::new();
        let snapshot = self.snapshot()?;
        snapshot
            .cursor(table)?
            .finish(&mut |p, e| out.push((p, e)))?;
        Ok(out)
    }

    /// See [`Index::snapshot`]; a missing index has nothing recorded.
    pub fn snapshot(&self) -> Result<Snapshot> {
        let tx = match &self.db {
            None => None,
            Some(db) => Some(guarded(&self.path, || {
                db.begin_read().map_err(|e| ierr(&self.path, e))
            })?),
        };
        Ok(Snapshot {
            path: self.path.clone(),
            tx,
            source_cached: self.source_cached,
            schema: self.schema,
        })
    }
}

/// A consistent view of the recorded tables (one redb read transaction), read as streams.
pub struct Snapshot {
    path: PathBuf,
    tx: Option<ReadTransaction>,
    /// False when the `source` table belongs to another source and reads as empty.
    source_cached: bool,
    /// The schema the records are encoded in.
    schema: u32,
}

type Records = redb::Range<'static, &'static [u8], &'static [u8]>;

impl Snapshot {
    fn records(&self, table: Table) -> Result<Option<Records>> {
        let Some(tx) = &self.tx else {
            return Ok(None);
        };
        if table == Table::Source && !self.source_cached {
            return Ok(None);
        }
        guarded(&self.path, || {
            let tbl = match tx.open_table(table.def()) {
                Ok(t) => t,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
                Err(e) => return Err(damaged(&self.path, e)),
            };
            let records = tbl.range::<&[u8]>(..).map_err(|e| ierr(&self.path, e))?;
            Ok(Some(records))
        })
    }

    /// A cursor over one recorded table, in canonical order.
    pub fn cursor(&self, table: Table) -> Result<Cursor> {
        Ok(Cursor {
            path: self.path.clone(),
            records: self.records(table)?,
            peeked: None,
            schema: self.schema,
        })
    }

    /// Every record of `table` that is a file whose hash is in `wanted`, in canonical order.
    pub fn files_with_hashes(
        &self,
        table: Table,
        wanted: &HashSet<Hash>,
    ) -> Result<Vec<(RelPath, Entry)>> {
        let mut found = Vec::new();
        let mut cursor = self.cursor(table)?;
        cursor.finish(&mut |path, e| {
            if e.file_hash().is_some_and(|h| wanted.contains(&h)) {
                found.push((path, e));
            }
        })?;
        Ok(found)
    }
}

/// Reads one recorded table in step with a walk of the same tree (both in canonical order),
/// holding one record at a time.
pub struct Cursor {
    path: PathBuf,
    records: Option<Records>,
    peeked: Option<Record>,
    schema: u32,
}

type Record = (
    redb::AccessGuard<'static, &'static [u8]>,
    redb::AccessGuard<'static, &'static [u8]>,
);

impl Cursor {
    fn next_record(&mut self) -> Result<Option<Record>> {
        if let Some(r) = self.peeked.take() {
            return Ok(Some(r));
        }
        let Some(records) = &mut self.records else {
            return Ok(None);
        };
        let path = &self.path;
        guarded(path, || {
            records.next().transpose().map_err(|e| ierr(path, e))
        })
    }

    /// Decodes and validates a record.
    fn decode(&self, (k, v): &Record) -> Result<(RelPath, Entry)> {
        let key = k.value();
        let rel = RelPath::from_bytes(key).map_err(|e| damaged(&self.path, e))?;
        Ok((rel, decode(&self.path, key, v.value(), self.schema)?))
    }

    /// Moves the cursor past `path`: hands each record before it to `passed` (paths the walk
    /// did not see) and returns the record of `path` itself, if there is one. Calls must come
    /// in canonical order.
    pub fn seek(
        &mut self,
        path: &RelPath,
        passed: &mut dyn FnMut(RelPath, Entry),
    ) -> Result<Option<Entry>> {
        while let Some(r) = self.next_record()? {
            match r.0.value().cmp(path.as_bytes()) {
                std::cmp::Ordering::Less => {
                    let (p, e) = self.decode(&r)?;
                    passed(p, e);
                }
                std::cmp::Ordering::Equal => {
                    return Ok(Some(decode(
                        &self.path,
                        r.0.value(),
                        r.1.value(),
                        self.schema,
                    )?));
                }
                std::cmp::Ordering::Greater => {
                    self.peeked = Some(r);
                    return Ok(None);
                }
            }
        }
        Ok(None)
    }

    /// Hands every record not reached yet to `passed`.
    pub fn finish(&mut self, passed: &mut dyn FnMut(RelPath, Entry)) -> Result<()> {
        while let Some(r) = self.next_record()? {
            let (p, e) = self.decode(&r)?;
            passed(p, e);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diff::tests::{file, p};
    use crate::entry::{Stamp, Time};

    fn roots<'a>(source: &'a Path, replica: &'a Path) -> Roots<'a> {
        Roots { source, replica }
    }

    /// An index of `/s` -> `/r` with one record in each table.
    fn made(path: &Path) -> Index {
        let index = Index::open(path, &roots(Path::new("/s"), Path::new("/r")), false).unwrap();
        index
            .commit(&[
                Update::Put(Table::Source, p("a"), file("a", 1)),
                Update::Put(Table::Replica, p("a"), file("a", 1)),
            ])
            .unwrap();
        index
    }

    fn meta_row(index: &Index, key: &str) -> Option<Vec<u8>> {
        let tx = index.db.begin_read().unwrap();
        let meta = tx.open_table(META).unwrap();
        meta.get(key).unwrap().map(|v| v.value().to_vec())
    }

    fn stamped(path: &str, fp: Stamp) -> Update {
        let mut e = file(path, 1);
        e.fp = fp;
        if path == "b" {
            e.link = Some(p("a"));
        }
        Update::Put(Table::Source, p(path), e)
    }

    /// One entry of each stamp variant, in the `source` table, besides [`made`]'s records.
    fn with_every_stamp(index: &Index) {
        let t = |sec, nsec| Time { sec, nsec };
        index
            .commit(&[
                stamped(
                    "b",
                    Stamp::Posix {
                        size: 1,
                        mtime: t(5, 6),
                        ctime: t(7, 8),
                        ino: 9,
                        dev: 10,
                    },
                ),
                stamped("c", Stamp::Seconds { size: 2, mtime: 3 }),
                stamped(
                    "d",
                    Stamp::Object {
                        size: 4,
                        etag: [5; 32],
                    },
                ),
            ])
            .unwrap();
    }

    #[test]
    fn entries_round_trip_through_the_index_for_every_stamp_variant() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("i.redb");
        let index = made(&path);
        with_every_stamp(&index);
        let loaded = index.load(Table::Source).unwrap();
        let stamps: Vec<Stamp> = loaded.iter().map(|(_, e)| e.fp).collect();
        assert!(matches!(stamps[1], Stamp::Posix { ino: 9, .. }));
        assert_eq!(stamps[2], Stamp::Seconds { size: 2, mtime: 3 });
        assert!(matches!(stamps[3], Stamp::Object { size: 4, .. }));
        drop(index);
        let r = roots(Path::new("/s"), Path::new("/r"));
        let read = ReadIndex::open(&path, &r).unwrap();
        assert_eq!(read.load(Table::Source).unwrap(), loaded);
    }

    /// Rewrites the index at `path` as the release of schema 2 wrote it: every record in the
    /// schema-2 encoding, and `"schema"` = 2. Every stamp must be POSIX (schema 2 had no other).
    fn downgrade_to_v2(index: Index) {
        let tx = index.db.begin_write().unwrap();
        for t in [SOURCE, REPLICA] {
            let mut tbl = tx.open_table(t).unwrap();
            let records: Vec<(Vec<u8>, Entry)> = tbl
                .iter()
                .unwrap()
                .map(|r| {
                    let (k, v) = r.unwrap();
                    let e = postcard::from_bytes::<Entry>(v.value()).unwrap();
                    (k.value().to_vec(), e)
                })
                .collect();
            for (k, e) in records {
                assert!(e.fp.node().is_some(), "schema 2 has only POSIX stamps");
                let old = v2::Entry {
                    content: e.content,
                    meta: e.meta,
                    fp: crate::entry::PosixV2(e.fp),
                    seen: e.seen,
                    link: e.link,
                };
                let v = postcard::to_stdvec(&old).unwrap();
                tbl.insert(&k[..], &v[..]).unwrap();
            }
        }
        let mut meta = tx.open_table(META).unwrap();
        meta.insert("schema", &2u32.to_le_bytes()[..]).unwrap();
        drop(meta);
        tx.commit().unwrap();
    }

    #[test]
    fn a_schema_2_index_is_read_as_it_is_and_migrated_by_a_writer() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("i.redb");
        let index = made(&path);
        index
            .commit(&[stamped(
                "b",
                Stamp::Posix {
                    size: 3,
                    mtime: Time { sec: 1, nsec: 2 },
                    ctime: Time { sec: 3, nsec: 4 },
                    ino: 5,
                    dev: 6,
                },
            )])
            .unwrap();
        let want = (
            index.load(Table::Source).unwrap(),
            index.load(Table::Replica).unwrap(),
        );
        downgrade_to_v2(index);
        let r = roots(Path::new("/s"), Path::new("/r"));
        // Strict decoding: the schema-2 records do not read as schema 3.
        {
            let raw = builder().create(&path).unwrap();
            let tx = raw.begin_read().unwrap();
            let tbl = tx.open_table(SOURCE).unwrap();
            let v = tbl.get(&b"b"[..]).unwrap().unwrap();
            assert!(decode(&path, b"b", v.value(), SCHEMA).is_err());
            assert!(decode(&path, b"b", v.value(), 2).is_ok());
        }
        let read = ReadIndex::open(&path, &r).unwrap();
        assert_eq!(
            read.load(Table::Source).unwrap(),
            want.0,
            "a reader decodes v2"
        );
        assert_eq!(read.load(Table::Replica).unwrap(), want.1);
        drop(read);
        let index = Index::open(&path, &r, false).unwrap();
        assert_eq!(
            meta_row(&index, "schema"),
            Some(SCHEMA.to_le_bytes().to_vec())
        );
        assert_eq!(
            index.load(Table::Source).unwrap(),
            want.0,
            "migrated as it was"
        );
        assert_eq!(index.load(Table::Replica).unwrap(), want.1);
        drop(index);
        let again = Index::open(&path, &r, false).unwrap();
        assert_eq!(again.load(Table::Source).unwrap(), want.0, "reopened");
    }

    #[test]
    fn a_migration_of_many_records_rewrites_every_batch() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("i.redb");
        let index = made(&path);
        let many: Vec<Update> = (0..10_000)
            .map(|i| Update::Put(Table::Replica, p(&format!("f{i:05}")), file("x", i)))
            .collect();
        index.commit(&many).unwrap();
        let want = index.load(Table::Replica).unwrap();
        downgrade_to_v2(index);
        let index = Index::open(&path, &roots(Path::new("/s"), Path::new("/r")), false).unwrap();
        assert_eq!(index.load(Table::Replica).unwrap(), want);
    }

    #[test]
    fn a_newer_schema_is_refused_and_left_as_it_is() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("i.redb");
        let index = made(&path);
        index.set_meta_value("schema", &4u32.to_le_bytes()).unwrap();
        drop(index);
        let r = roots(Path::new("/s"), Path::new("/r"));
        let too_new = |e: Error| {
            let msg = e.to_string();
            assert!(
                msg.contains("newer dirsync") && msg.contains("schema 4"),
                "{msg}"
            );
            matches!(e, Error::IndexTooNew { found: 4, .. })
        };
        assert!(too_new(Index::open(&path, &r, false).err().unwrap()));
        assert!(too_new(ReadIndex::open(&path, &r).err().unwrap()));
        let raw = builder().create(&path).unwrap();
        let tx = raw.begin_read().unwrap();
        let schema = tx.open_table(META).unwrap().get("schema").unwrap().unwrap();
        assert_eq!(schema.value(), 4u32.to_le_bytes(), "untouched");
    }

    #[test]
    fn another_source_resets_only_the_source_table() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("i.redb");
        drop(made(&path));
        let r = roots(Path::new("/s2"), Path::new("/r"));
        // A reader ignores the old source's cache and writes nothing.
        let read = ReadIndex::open(&path, &r).unwrap().snapshot().unwrap();
        assert!(read.records(Table::Source).unwrap().is_none());
        assert!(read.records(Table::Replica).unwrap().is_some());
        drop(read);
        let index = Index::open(&path, &r, false).unwrap();
        assert!(index.load(Table::Source).unwrap().is_empty());
        assert_eq!(index.load(Table::Replica).unwrap().len(), 1);
        assert_eq!(meta_row(&index, "source").as_deref(), Some(&b"/s2"[..]));
    }

    #[test]
    fn another_replica_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("i.redb");
        drop(made(&path));
        let r = roots(Path::new("/s"), Path::new("/r2"));
        let refused = |e: Error| matches!(e, Error::IndexMismatch { .. });
        assert!(refused(Index::open(&path, &r, false).err().unwrap()));
        assert!(refused(ReadIndex::open(&path, &r).err().unwrap()));
        let index = Index::open(&path, &r, true).unwrap();
        assert!(index.load(Table::Replica).unwrap().is_empty());
        assert_eq!(meta_row(&index, "replica").as_deref(), Some(&b"/r2"[..]));
    }

    #[test]
    fn an_index_without_a_recorded_replica_takes_the_given_one() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("i.redb");
        let index = made(&path);
        let tx = index.db.begin_write().unwrap();
        tx.open_table(META).unwrap().remove("replica").unwrap();
        tx.commit().unwrap();
        drop(index);
        let r = roots(Path::new("/s"), Path::new("/elsewhere"));
        ReadIndex::open(&path, &r).unwrap();
        let index = Index::open(&path, &r, false).unwrap();
        assert_eq!(index.load(Table::Replica).unwrap().len(), 1);
        assert_eq!(index.load(Table::Source).unwrap().len(), 1);
        assert_eq!(
            meta_row(&index, "replica").as_deref(),
            Some(&b"/elsewhere"[..])
        );
        drop(index);
        let other = roots(Path::new("/s"), Path::new("/r"));
        assert!(Index::open(&path, &other, false).is_err());
    }
}
