//! Per-path errors carry a kind a program can act on: real failures (a source directory nobody
//! may read, a replica directory made immutable, a replica mounted read-only) show up in the
//! JSON rendering of a pass with their path and kind. The assertions are on kinds and paths,
//! never on the English messages.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::atomic::AtomicBool;

use common::*;
use serde_json::Value;

/// One sync of the fixture's trees through the library, rendered as `status --json` renders a
/// pass: the operations' errors are there too.
fn sync_json(fx: &Fixture) -> Value {
    use dirsync::sync::Session;

    let cfg = fx.config();
    let mut session = Session::open(&cfg).unwrap();
    let report = session.sync(&AtomicBool::new(false)).unwrap();
    dirsync::report::to_json(&report)
}

/// The `(path, kind)` of each error of a JSON document, checking that each has a message.
fn errors(v: &Value) -> Vec<(String, String)> {
    let list = v["errors"]
        .as_array()
        .unwrap_or_else(|| panic!("no errors list: {v}"));
    list.iter()
        .map(|e| {
            assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{e}");
            let field = |k: &str| {
                e[k].as_str()
                    .unwrap_or_else(|| panic!("{k}: {e}"))
                    .to_owned()
            };
            (field("path"), field("kind"))
        })
        .collect()
}

/// A mount that is undone when the test ends, even when it fails.
struct Mounted(std::path::PathBuf);

impl Mounted {
    /// Makes `dir` a read-only bind mount of itself; `None` when mounts are not allowed here.
    fn read_only(dir: &Path) -> Option<Mounted> {
        let run = |args: &[&str]| {
            Command::new("mount")
                .args(args)
                .arg(dir)
                .status()
                .is_ok_and(|s| s.success())
        };
        if !is_root() || !run(&["--bind", dir.to_str()?]) {
            return None;
        }
        let m = Mounted(dir.to_path_buf());
        run(&["-o", "remount,bind,ro"]).then_some(m)
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn an_unreadable_source_directory_is_permission_denied_in_status_json() {
    if !is_root() {
        eprintln!("skipped: needs root to drop to nobody");
        return;
    }
    let fx = Fixture::default();
    write(&fx.src.join("ok"), "ok");
    write(&fx.src.join("secret/x"), "x");
    chown_tree(&fx.root);
    set_mode(&fx.src.join("secret"), 0o000);
    let out = fx
        .nobody_cmd()
        .args(["status".as_ref(), "--json".as_ref(), fx.src.as_os_str()])
        .arg(&fx.dst)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let secret = fx.src.join("secret").display().to_string();
    assert_eq!(errors(&v), [(secret, "permission_denied".into())], "{v}");
    assert_eq!(v["summary"]["errors"], 1, "{v}");
    // The readable rest is planned as usual.
    let changes = v["changes"].as_array().unwrap();
    assert!(changes.iter().any(|c| c["path"] == "ok"), "{v}");
}

#[test]
fn a_write_into_an_immutable_replica_directory_is_permission_denied() {
    let fx = Fixture::default();
    mkdir(&fx.src.join("locked"));
    write(&fx.src.join("keep"), "k");
    fx.sync().code(0);
    write(&fx.src.join("locked/x"), "x");
    write(&fx.src.join("open/z"), "z");
    let Some(_guard) = Immutable::set(&fx.dst.join("locked")) else {
        eprintln!("skipped: the filesystem has no immutable attribute");
        return;
    };
    let v = sync_json(&fx);
    let errs = errors(&v);
    assert!(
        errs.contains(&("locked/x".into(), "permission_denied".into())),
        "{v}"
    );
    assert!(errs.iter().all(|(_, k)| k == "permission_denied"), "{v}");
    assert_eq!(v["summary"]["errors"], errs.len(), "{v}");
    assert!(fx.dst.join("open/z").exists());
}

#[test]
fn a_read_only_replica_mount_is_read_only() {
    let fx = Fixture::default();
    write(&fx.src.join("a"), "a");
    fx.sync().code(0);
    write(&fx.src.join("b"), "b");
    write(&fx.src.join("n/c"), "c");
    let Some(_ro) = Mounted::read_only(&fx.dst) else {
        eprintln!("skipped: needs root for a read-only bind mount");
        return;
    };
    let v = sync_json(&fx);
    let errs = errors(&v);
    // The run stops at the first refused write, reported once.
    assert_eq!(errs.len(), 1, "{v}");
    assert_eq!(errs[0].1, "read_only", "{v}");
    assert!(["b", "n"].contains(&errs[0].0.as_str()), "{v}");
}
