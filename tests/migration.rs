//! Indexes written by the release of index schema 2 are migrated, not rebuilt: the checked-in
//! fixture `tests/fixtures/index-v2/` (made by that release's binary, see its README) opens
//! with every record as it was, `sync` and `status` work on it without `--reindex`, and an
//! index whose stamps match the live tree hashes nothing on its first pass after migration.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use common::*;
use dirsync::entry::{Content, Entry, Meta, RelPath, Stamp, Time};
use dirsync::index::{FS_TRAITS, Index, ReadIndex, Roots, SCHEMA, Table};
use redb::ReadableDatabase;
use serde::{Serialize, Serializer};
use serde_json::Value;

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/index-v2")
}

fn manifest() -> Value {
    let text = fs::read_to_string(fixture_dir().join("manifest.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// A copy of the fixture index in `dir`: the checked-in file is never opened for writing.
fn fixture_copy(dir: &Path) -> PathBuf {
    let copy = dir.join("index-v2.redb");
    fs::copy(fixture_dir().join("index.redb"), &copy).unwrap();
    copy
}

/// Builds the fixture's source tree at `dir` with the script it was made with.
fn fixture_tree(dir: &Path) {
    let script = fixture_dir().join("tree.sh");
    let ok = std::process::Command::new("sh")
        .arg(&script)
        .arg(dir)
        .status()
        .unwrap();
    assert!(ok.success(), "{} failed", script.display());
}

fn schema_of(index: &Index) -> Option<u32> {
    let raw = index.meta_value("schema").unwrap()?;
    Some(u32::from_le_bytes(raw.try_into().unwrap()))
}

/// The schema recorded in the index file at `path`, read with redb itself.
fn schema_in_file(path: &Path) -> u32 {
    let db = redb::Database::open(path).unwrap();
    let tx = db.begin_read().unwrap();
    let meta = tx.open_table(META).unwrap();
    let v = meta.get("schema").unwrap().unwrap();
    u32::from_le_bytes(v.value().try_into().unwrap())
}

const META: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("meta");

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn time(v: &Value) -> Time {
    Time {
        sec: v["sec"].as_i64().unwrap(),
        nsec: v["nsec"].as_u64().unwrap() as u32,
    }
}

/// The entry a manifest row describes, with its stamp as the POSIX stamp of the same values.
fn expected(row: &Value) -> (String, Entry) {
    let hash = row["hash"].as_str().map(|h| {
        let b: Vec<u8> = (0..32)
            .map(|i| u8::from_str_radix(&h[2 * i..2 * i + 2], 16).unwrap())
            .collect();
        <[u8; 32]>::try_from(b).unwrap()
    });
    assert_eq!(row["kind"], "file", "the fixture records files only");
    let m = &row["meta"];
    let s = &row["stamp"];
    let link = row["link_hex"].as_str().map(|h| {
        let b: Vec<u8> = (0..h.len() / 2)
            .map(|i| u8::from_str_radix(&h[2 * i..2 * i + 2], 16).unwrap())
            .collect();
        RelPath::from_bytes(&b).unwrap()
    });
    let entry = Entry {
        content: Content::File {
            size: row["size"].as_u64().unwrap(),
            hash,
        },
        meta: Meta {
            mode: m["mode"].as_u64().unwrap() as u32,
            mtime: time(&m["mtime"]),
            uid: m["uid"].as_u64().unwrap() as u32,
            gid: m["gid"].as_u64().unwrap() as u32,
        },
        fp: Stamp::Posix {
            size: s["size"].as_u64().unwrap(),
            mtime: time(&s["mtime"]),
            ctime: time(&s["ctime"]),
            ino: s["ino"].as_u64().unwrap(),
            dev: s["dev"].as_u64().unwrap(),
        },
        seen: time(&row["seen"]),
        link,
    };
    (row["path_hex"].as_str().unwrap().to_owned(), entry)
}

fn assert_as_manifest(index: &Index, m: &Value, when: &str) {
    for (table, name) in [(Table::Source, "source"), (Table::Replica, "replica")] {
        let got: Vec<(String, Entry)> = index
            .load(table)
            .unwrap()
            .into_iter()
            .map(|(p, e)| (hex(p.as_bytes()), e))
            .collect();
        let want: Vec<(String, Entry)> = m[name].as_array().unwrap().iter().map(expected).collect();
        assert_eq!(got, want, "{when}: the {name} table");
    }
}

#[test]
fn the_release_index_is_migrated_on_first_open_with_every_record_as_it_was() {
    let tmp = tempfile::tempdir().unwrap();
    let copy = fixture_copy(tmp.path());
    let m = manifest();
    assert_eq!(m["schema"], 2);
    assert_eq!(
        schema_in_file(&copy),
        2,
        "the fixture is an index of schema 2"
    );
    let (source, replica) = (
        PathBuf::from(m["source_root"].as_str().unwrap()),
        PathBuf::from(m["replica_root"].as_str().unwrap()),
    );
    let roots = Roots {
        source: &source,
        replica: &replica,
    };
    let index = Index::open(&copy, &roots, false).unwrap();
    assert_eq!(schema_of(&index), Some(SCHEMA));
    assert_eq!(SCHEMA, 3);
    assert_as_manifest(&index, &m, "migrated");
    let fs_traits = index.meta_value(FS_TRAITS).unwrap().map(|v| hex(&v));
    assert_eq!(
        fs_traits.as_deref(),
        m["replica_fs_hex"].as_str(),
        "meta kept"
    );
    drop(index);
    assert_eq!(schema_in_file(&copy), 3, "the migration is durable");
    let index = Index::open(&copy, &roots, false).unwrap();
    assert_as_manifest(&index, &m, "reopened");
    drop(index);
    let read = ReadIndex::open(&copy, &roots).unwrap();
    assert_eq!(
        read.load(Table::Replica).unwrap().len(),
        8,
        "a reader after it"
    );
}

/// Points a copy of the fixture at this test's trees (it records the roots it was made at).
fn repoint(copy: &Path, fx: &Fixture) {
    let db = redb::Database::open(copy).unwrap();
    let tx = db.begin_write().unwrap();
    {
        let mut meta = tx.open_table(META).unwrap();
        for (key, dir) in [("source", &fx.src), ("replica", &fx.dst)] {
            let canon = fs::canonicalize(dir).unwrap();
            meta.insert(key, canon.as_os_str().as_encoded_bytes())
                .unwrap();
        }
    }
    tx.commit().unwrap();
}

/// The fixture's trees rebuilt in `fx` (the replica as the release left it: a mirror), with a
/// copy of the fixture index pointed at them.
fn rebuilt(fx: &Fixture) -> PathBuf {
    fs::remove_dir(&fx.src).unwrap();
    fixture_tree(&fx.src);
    fixture_tree(&fx.dst);
    let copy = fixture_copy(&fx.root);
    repoint(&copy, fx);
    assert_eq!(schema_in_file(&copy), 2);
    copy
}

#[test]
fn sync_with_the_release_index_needs_no_reindex_and_ends_mirrored() {
    let fx = Fixture::default();
    let copy = rebuilt(&fx);
    fs::write(fx.src.join("a/hello.txt"), "changed since\n").unwrap();
    let out = fx
        .run("sync", &["--index", copy.to_str().unwrap()])
        .success();
    let err = stderr_of(&out);
    assert!(!err.contains("reindex"), "{err}");
    assert_mirror(&fx.src, &fx.dst);
    assert_eq!(schema_in_file(&copy), SCHEMA);
    fx.run("sync", &["--index", copy.to_str().unwrap()])
        .success();
    assert_mirror(&fx.src, &fx.dst);
}

/// A tmpfs of `size` mounted at the path, unmounted when the test ends, even when it fails.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Tmpfs {
        fs::create_dir_all(at).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .unwrap()
            .success();
        assert!(ok, "mount tmpfs at {}", at.display());
        Tmpfs(at.to_path_buf())
    }

    fn resize(&self, size: &str) {
        let ok = std::process::Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .status()
            .unwrap()
            .success();
        assert!(ok, "remount {}", self.0.display());
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_migration_without_room_is_refused_before_anything_is_written() {
    if !is_root() {
        println!("skipped: mounting a small filesystem needs root");
        return;
    }
    let fx = Fixture::default();
    let copy = rebuilt(&fx);
    let small = Tmpfs::mount(&fx.root.join("small"), "4m");
    let index = small.0.join("index.redb");
    fs::copy(&copy, &index).unwrap();
    fs::write(fx.src.join("a/hello.txt"), "changed since\n").unwrap();
    let before = fs::metadata(&index).unwrap().len();
    let replica_before = snapshot(&fx.dst);
    let arg = ["--index", index.to_str().unwrap()];
    let err = stderr_of(&fx.run("sync", &arg).failure());
    assert!(
        err.contains("must be migrated") && err.contains("MiB free"),
        "{err}"
    );
    // Opening the database rewrites its header; the records stay as they were, unmigrated.
    assert_eq!(schema_in_file(&index), 2, "not migrated");
    let after = fs::metadata(&index).unwrap().len();
    assert!(
        after <= before + (1 << 20),
        "the index grew from {before} to {after} bytes"
    );
    assert_eq!(
        snapshot(&fx.dst),
        replica_before,
        "the replica is as it was"
    );
    small.resize("64m");
    fx.run("sync", &arg).success();
    assert_eq!(schema_in_file(&index), SCHEMA);
    assert_mirror(&fx.src, &fx.dst);
}

#[test]
fn status_reads_the_release_index_and_leaves_it_as_it_is() {
    let fx = Fixture::default();
    let copy = rebuilt(&fx);
    fs::write(fx.src.join("a/hello.txt"), "changed since\n").unwrap();
    let before = fs::read(&copy).unwrap();
    let out = fx
        .run("status", &["--index", copy.to_str().unwrap()])
        .success();
    let lines = stdout_lines(&out);
    assert_eq!(lines, ["M a/hello.txt"], "{}", stderr_of(&out));
    assert_eq!(fs::read(&copy).unwrap(), before, "a reader never writes");
}

/// A schema-2 stamp: the five POSIX fields at fixed widths, untagged (48 bytes).
struct PosixV2([u8; 48]);

impl PosixV2 {
    fn of(fp: &Stamp) -> PosixV2 {
        let Stamp::Posix {
            size,
            mtime,
            ctime,
            ino,
            dev,
        } = *fp
        else {
            panic!("schema 2 knew only POSIX stamps: {fp:?}");
        };
        let mut b = Vec::with_capacity(48);
        b.extend_from_slice(&size.to_le_bytes());
        for t in [mtime, ctime] {
            b.extend_from_slice(&t.sec.to_le_bytes());
            b.extend_from_slice(&t.nsec.to_le_bytes());
        }
        b.extend_from_slice(&ino.to_le_bytes());
        b.extend_from_slice(&dev.to_le_bytes());
        PosixV2(b.try_into().unwrap())
    }
}

impl Serialize for PosixV2 {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

/// An entry in the value encoding of schema 2 (field order is the encoding).
#[derive(Serialize)]
struct EntryV2<'a> {
    content: &'a Content,
    meta: &'a Meta,
    fp: PosixV2,
    seen: &'a Time,
    link: &'a Option<RelPath>,
}

/// Rewrites the index at `path` as the schema-2 release wrote it: every record in the schema-2
/// encoding, and `"schema"` = 2.
fn downgrade_to_v2(path: &Path, roots: &Roots) {
    let index = Index::open(path, roots, false).unwrap();
    let tables = [Table::Source, Table::Replica].map(|t| index.load(t).unwrap());
    drop(index);
    let db = redb::Database::open(path).unwrap();
    let tx = db.begin_write().unwrap();
    for (name, records) in ["source", "replica"].iter().zip(&tables) {
        let def: redb::TableDefinition<&[u8], &[u8]> = redb::TableDefinition::new(name);
        let mut tbl = tx.open_table(def).unwrap();
        for (p, e) in records {
            let v2 = EntryV2 {
                content: &e.content,
                meta: &e.meta,
                fp: PosixV2::of(&e.fp),
                seen: &e.seen,
                link: &e.link,
            };
            tbl.insert(p.as_bytes(), &postcard::to_stdvec(&v2).unwrap()[..])
                .unwrap();
        }
    }
    tx.open_table(META)
        .unwrap()
        .insert("schema", &2u32.to_le_bytes()[..])
        .unwrap();
    tx.commit().unwrap();
}

#[test]
fn a_release_index_whose_stamps_match_the_tree_is_not_rehashed() {
    let fx = Fixture::default();
    fs::remove_dir(&fx.src).unwrap();
    fixture_tree(&fx.src);
    // Each pass starts past the racy window of the last change, so that the hashes it records
    // are trusted by the next.
    let settle = || std::thread::sleep(std::time::Duration::from_millis(100));
    let cfg = fx.config();
    let stop = AtomicBool::new(false);
    // The first sync copies everything; the second records the replica's hard-link pair as
    // the second link left it (linking changed its ctime). From then on, a pass hashes nothing.
    for _ in 0..2 {
        settle();
        let mut session = dirsync::sync::Session::open(&cfg).unwrap();
        session.sync(&stop).unwrap();
    }
    settle();
    let settled = dirsync::sync::status(&cfg).unwrap();
    assert_eq!(settled.files_hashed, 0, "with the current schema");
    let roots = Roots {
        source: &cfg.roots.source,
        replica: &cfg.roots.replica,
    };
    downgrade_to_v2(&cfg.index, &roots);
    assert_eq!(schema_in_file(&cfg.index), 2);
    let mut reindexed = cfg.clone();
    reindexed.index = fx.root.join("control.redb");
    fs::copy(&cfg.index, &reindexed.index).unwrap();

    let status = dirsync::sync::status(&cfg).unwrap();
    assert_eq!(status.files_hashed, 0, "a reader trusts schema-2 stamps");
    assert!(status.plan.ops.is_empty(), "{:?}", status.plan.ops);
    assert_eq!(schema_in_file(&cfg.index), 2, "a reader does not migrate");

    let mut session = dirsync::sync::Session::open(&cfg).unwrap();
    let after = session.sync(&stop).unwrap();
    assert_eq!(
        after.files_hashed, 0,
        "nothing rehashed after the migration"
    );
    assert!(after.plan.ops.is_empty(), "{:?}", after.plan.ops);
    drop(session);
    assert_eq!(schema_in_file(&cfg.index), SCHEMA);
    assert_mirror(&fx.src, &fx.dst);

    // The figure can be other than zero: a rebuilt index reads the files again.
    reindexed.reindex = true;
    let rebuilt = dirsync::sync::Session::open(&reindexed)
        .unwrap()
        .sync(&stop)
        .unwrap();
    assert!(rebuilt.files_hashed >= 7, "{}", rebuilt.files_hashed);
}

#[test]
fn an_index_of_a_newer_schema_is_refused_by_sync_and_status() {
    let fx = Fixture::default();
    write(&fx.src.join("f"), "x");
    fx.sync().success();
    let index = fs::read_dir(fx.state.join("dirsync"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "redb"))
        .expect("the default index");
    {
        let db = redb::Database::open(&index).unwrap();
        let tx = db.begin_write().unwrap();
        tx.open_table(META)
            .unwrap()
            .insert("schema", &(SCHEMA + 1).to_le_bytes()[..])
            .unwrap();
        tx.commit().unwrap();
    }
    for out in [fx.sync().failure(), fx.status().failure()] {
        let err = stderr_of(&out);
        assert!(
            err.contains("newer dirsync") && err.contains(&format!("schema {}", SCHEMA + 1)),
            "{err}"
        );
    }
    assert_eq!(schema_in_file(&index), SCHEMA + 1, "left as it is");
}
