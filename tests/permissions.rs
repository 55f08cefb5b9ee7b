//! Read-only parts of the replica, for a user that is not root: dirsync makes a read-only
//! directory writable for as long as it changes it, then gives it back its mode.

mod common;

use std::fs;
use std::os::unix::fs::{PermissionsExt, chown};
use std::path::Path;
use std::process::Command;

use common::{assert_mirror, set_mode, write};

const NOBODY: u32 = 65534;

/// Runs the built binary as `nobody`, or returns None where that is impossible (not root, or
/// no `setpriv`).
fn sync_as_nobody(src: &Path, dst: &Path, state: &Path) -> Option<std::process::Output> {
    if !rustix::process::geteuid().is_root() {
        return None;
    }
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "env"])
        .arg(format!("XDG_STATE_HOME={}", state.display()))
        .arg(assert_cmd::cargo::cargo_bin("dirsync"))
        .arg("sync")
        .arg(src)
        .arg(dst)
        .output()
        .ok()?;
    Some(out)
}

fn chown_tree(root: &Path) {
    chown(root, Some(NOBODY), Some(NOBODY)).unwrap();
    for e in fs::read_dir(root).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            chown_tree(&p);
        } else {
            chown(&p, Some(NOBODY), Some(NOBODY)).unwrap();
        }
    }
}

#[test]
fn read_only_replica_directories_are_changed_and_keep_their_mode() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, dst, state) = (
        tmp.path().join("src"),
        tmp.path().join("dst"),
        tmp.path().join("state"),
    );
    write(&src.join("locked/a"), "a");
    write(&src.join("locked/gone"), "g");
    write(&src.join("open/x"), "x");
    fs::create_dir_all(&state).unwrap();
    set_mode(&src.join("locked"), 0o555);
    chown_tree(tmp.path());
    let Some(first) = sync_as_nobody(&src, &dst, &state) else {
        eprintln!("skipped: needs root to drop to nobody with setpriv");
        return;
    };
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    assert_mirror(&src, &dst);

    // Change the read-only directory's entries in the source; the replica copy is 0555 too.
    set_mode(&src.join("locked"), 0o755);
    write(&src.join("locked/b"), "b");
    fs::remove_file(src.join("locked/gone")).unwrap();
    fs::rename(src.join("open/x"), src.join("locked/x")).unwrap();
    set_mode(&src.join("locked"), 0o555);
    chown_tree(&src);
    let second = sync_as_nobody(&src, &dst, &state).unwrap();
    assert_eq!(
        second.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
    assert_mirror(&src, &dst);
    let mode = fs::metadata(dst.join("locked"))
        .unwrap()
        .permissions()
        .mode()
        & 0o7777;
    assert_eq!(mode, 0o555);
}
