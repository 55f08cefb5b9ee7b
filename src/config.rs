//! Validated configuration: the two roots, resolved and checked against each other, and where
//! the index and the log live. Everything here runs before anything is written, so bad input
//! changes nothing on disk.

use std::io;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use crate::error::{Error, Result};

/// The two trees of a sync, as canonical absolute paths.
#[derive(Clone, Debug)]
pub struct Roots {
    pub source: PathBuf,
    /// SRC as given (made absolute, symlinks kept): `watch` resolves it again at each pass.
    pub source_arg: PathBuf,
    pub replica: PathBuf,
    /// False when the replica directory does not exist yet (`sync` creates it).
    pub replica_exists: bool,
}

/// Everything a command needs, validated.
#[derive(Clone, Debug)]
pub struct Config {
    pub roots: Roots,
    pub index: PathBuf,
    pub log_file: Option<PathBuf>,
    pub reindex: bool,
    pub allow_empty_source: bool,
    pub max_delete: Option<usize>,
    /// Owners are replicated only when running as root, as `rsync -a` does.
    pub owners: bool,
    pub interval: Duration,
}

fn bad(msg: String) -> Error {
    Error::BadInput { msg }
}

/// Resolves and checks SRC and DST.
pub fn resolve_roots(src: &Path, dst: &Path) -> Result<Roots> {
    let source = match std::fs::metadata(src) {
        Ok(md) if md.is_dir() => std::fs::canonicalize(src).map_err(|e| Error::io(src, e))?,
        Ok(_) => {
            return Err(bad(format!(
                "source {} is not a directory; give the directory to mirror",
                src.display()
            )));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(bad(format!(
                "source {} does not exist; check the path (is the disk mounted?)",
                src.display()
            )));
        }
        Err(e) => return Err(Error::io(src, e)),
    };
    let (replica, replica_exists) = match std::fs::symlink_metadata(dst) {
        Ok(_) => match std::fs::metadata(dst) {
            Ok(md) if md.is_dir() => (
                std::fs::canonicalize(dst).map_err(|e| Error::io(dst, e))?,
                true,
            ),
            Ok(_) => {
                return Err(bad(format!(
                    "replica {} exists and is not a directory; remove it or choose another replica path",
                    dst.display()
                )));
            }
            Err(_) => {
                return Err(bad(format!(
                    "replica {} is a symlink to nothing; remove it or choose another replica path",
                    dst.display()
                )));
            }
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => (canonical_missing(dst)?, false),
        Err(e) => return Err(Error::io(dst, e)),
    };
    if source == replica {
        return Err(bad(format!(
            "source {} and replica {} are the same directory ({}); nothing to do",
            src.display(),
            dst.display(),
            source.display()
        )));
    }
    if replica.starts_with(&source) {
        return Err(bad(format!(
            "replica {} is inside source {}; it would copy itself; choose a replica outside the source",
            replica.display(),
            source.display()
        )));
    }
    if source.starts_with(&replica) {
        return Err(bad(format!(
            "source {} is inside replica {}; mirroring would delete the source; choose a replica outside it",
            source.display(),
            replica.display()
        )));
    }
    Ok(Roots {
        source,
        source_arg: std::path::absolute(src).map_err(|e| Error::io(src, e))?,
        replica,
        replica_exists,
    })
}

/// The canonical form of a path that does not exist yet: its deepest existing ancestor,
/// canonicalized, with the rest appended.
fn canonical_missing(path: &Path) -> Result<PathBuf> {
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .map_err(|e| Error::io(".", e))?
            .join(path)
    };
    let mut rest = Vec::new();
    let mut cur = abs.as_path();
    loop {
        match std::fs::canonicalize(cur) {
            Ok(base) => {
                let mut out = base;
                for part in rest.iter().rev() {
                    out.push(part);
                }
                return Ok(out);
            }
            Err(_) => {
                let name = cur.file_name().ok_or_else(|| {
                    bad(format!(
                        "replica path {} cannot be resolved",
                        path.display()
                    ))
                })?;
                if cur.components().next_back() == Some(Component::ParentDir) {
                    return Err(bad(format!(
                        "replica path {} has '..' below a missing directory",
                        path.display()
                    )));
                }
                rest.push(name.to_os_string());
                cur = cur.parent().unwrap_or(Path::new("/"));
            }
        }
    }
}

/// The absolute form of a file path that may not exist (its directory is canonicalized).
pub fn absolute_file(path: &Path) -> Result<PathBuf> {
    let name = path
        .file_name()
        .ok_or_else(|| bad(format!("{} is not a file path", path.display())))?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    Ok(canonical_missing(dir)?.join(name))
}

/// Refuses a file (index, log) that would live inside one of the trees.
pub fn check_outside(file: &Path, roots: &Roots, what: &str) -> Result<()> {
    for (root, name) in [(&roots.source, "source"), (&roots.replica, "replica")] {
        if file.starts_with(root) {
            return Err(bad(format!(
                "the {what} {} is inside the {name} {}; it would be synced along with the tree; put it elsewhere",
                file.display(),
                root.display()
            )));
        }
    }
    Ok(())
}

/// Where the index of a replica lives by default: the user's state directory, one file per
/// canonical replica path.
pub fn default_index(replica: &Path) -> Result<PathBuf> {
    let base = match std::env::var_os("XDG_STATE_HOME").filter(|v| !v.is_empty()) {
        Some(d) => PathBuf::from(d),
        None => match std::env::var_os("HOME").filter(|v| !v.is_empty()) {
            Some(h) => PathBuf::from(h).join(".local/state"),
            None => {
                return Err(bad(
                    "neither XDG_STATE_HOME nor HOME is set; pass --index PATH".to_string(),
                ));
            }
        },
    };
    let digest = blake3::hash(replica.as_os_str().as_encoded_bytes());
    let name: String = replica
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "root".into())
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(40)
        .collect();
    let hex = digest.to_hex();
    Ok(base
        .join("dirsync")
        .join(format!("{name}-{}.redb", &hex.as_str()[..16])))
}
