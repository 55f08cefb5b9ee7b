//! Validated configuration: the two roots, resolved and checked against each other, and where
//! the index and the log live. Everything here runs before anything is written, so bad input
//! changes nothing on disk.

use std::io;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use crate::error::{Error, Result};
use crate::nesting::{DirId, Place, existing_prefix};

/// The two trees of a sync, as canonical absolute paths.
#[derive(Clone, Debug)]
pub struct Roots {
    pub source: PathBuf,
    /// SRC as given (made absolute, symlinks kept): `watch` resolves it again at each pass.
    pub source_arg: PathBuf,
    pub replica: PathBuf,
    /// False when the replica directory does not exist yet (`sync` creates it).
    pub replica_exists: bool,
    /// The directories the checks above were made on: a root opened later must be one of these
    /// (see [`Roots::check_source`]), or a swap between the check and the use would go unseen.
    pub source_id: DirId,
    pub replica_id: Option<DirId>,
}

impl Roots {
    /// Fails unless the source root opened as `fd` is the directory that was checked.
    pub fn check_source(&self, fd: std::os::fd::BorrowedFd) -> Result<()> {
        check_id(fd, self.source_id, &self.source, "source")
    }

    /// Fails unless the replica root opened as `fd` is the directory that was checked (when one
    /// existed then).
    pub fn check_replica(&self, fd: std::os::fd::BorrowedFd) -> Result<()> {
        match self.replica_id {
            Some(id) => check_id(fd, id, &self.replica, "replica"),
            None => Ok(()),
        }
    }
}

fn check_id(fd: std::os::fd::BorrowedFd, want: DirId, path: &Path, what: &str) -> Result<()> {
    let st = rustix::fs::fstat(fd).map_err(|e| Error::io(path, e.into()))?;
    if (st.st_dev, st.st_ino) == (want.dev, want.ino) {
        return Ok(());
    }
    Err(Error::Refused {
        msg: format!(
            "the {what} {} is another directory than the one checked a moment ago (replaced or \
             swapped meanwhile); nothing was changed; run again once it stays put",
            path.display()
        ),
    })
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
    let (source_id, replica_id) = check_apart(src, dst, &source, &replica, replica_exists)?;
    Ok(Roots {
        source,
        source_arg: std::path::absolute(src).map_err(|e| Error::io(src, e))?,
        replica,
        replica_exists,
        source_id,
        replica_id: replica_exists.then_some(replica_id),
    })
}

/// Refuses roots that are one directory, or one inside the other, however they are reached:
/// see [`Place`]. A missing replica is inside the source when its deepest existing ancestor is.
/// Returns the identities of the source and of the replica (or its deepest existing ancestor)
/// that were checked.
fn check_apart(
    src: &Path,
    dst: &Path,
    source: &Path,
    replica: &Path,
    replica_exists: bool,
) -> Result<(DirId, DirId)> {
    let src_place = Place::of(source).map_err(|e| Error::io(source, e))?;
    let (base, _) = existing_prefix(replica);
    let dst_place = Place::of(base).map_err(|e| Error::io(base, e))?;
    if replica_exists && dst_place.is_same(&src_place) {
        return Err(bad(format!(
            "source {} and replica {} are the same directory ({}); nothing to do",
            src.display(),
            dst.display(),
            source.display()
        )));
    }
    if dst_place.is_within(&src_place) {
        return Err(bad(format!(
            "replica {} is inside source {}{}; it would copy itself; choose a replica outside the \
             source",
            dst.display(),
            source.display(),
            through_mount(replica, source)
        )));
    }
    if replica_exists && src_place.is_within(&dst_place) {
        return Err(bad(format!(
            "source {} is inside replica {}{}; mirroring would delete the source; choose a \
             replica outside it",
            src.display(),
            replica.display(),
            through_mount(source, replica)
        )));
    }
    Ok((src_place.id(), dst_place.id()))
}

/// Says how `inner` can be inside `outer` when their canonical paths do not show it.
fn through_mount(inner: &Path, outer: &Path) -> &'static str {
    if inner.starts_with(outer) {
        ""
    } else {
        " (a mount shows the same directories at another path)"
    }
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

/// Symlinks followed to find a file before giving up, as the kernel's limit.
const MAX_LINKS: usize = 40;

/// Where a file path given by the user really leads: every symlink followed, also one whose
/// target does not exist yet (it would be created there). The result is canonical up to its
/// last name, which is not a symlink.
pub fn resolve_file(given: &Path) -> Result<PathBuf> {
    let mut path = given.to_path_buf();
    for _ in 0..MAX_LINKS {
        match std::fs::symlink_metadata(&path) {
            Ok(md) if md.file_type().is_symlink() => {
                let target = std::fs::read_link(&path).map_err(|e| Error::io(&path, e))?;
                let dir = path.parent().unwrap_or(Path::new(""));
                // An absolute target replaces the whole path.
                path = dir.join(target);
            }
            Ok(_) => return absolute_file(&path),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return absolute_file(&path),
            Err(e) => return Err(Error::io(&path, e)),
        }
    }
    Err(bad(format!(
        "{} leads through more than {MAX_LINKS} symlinks; give the file's real path",
        given.display()
    )))
}

/// Resolves a file given for the index or the log (see [`resolve_file`]) and refuses it
/// inside either tree, however it is reached (see [`Place`]). Returns the resolved path, which
/// is the one to open, so that what was checked is what is used.
pub fn file_outside(given: &Path, roots: &Roots, what: &str) -> Result<PathBuf> {
    let file = resolve_file(given)?;
    let dir = file.parent().unwrap_or(Path::new("/"));
    let (base, missing) = existing_prefix(dir);
    let place = Place::of(base).map_err(|e| Error::io(base, e))?;
    for (root, exists, name) in [
        (&roots.source, true, "source"),
        (&roots.replica, roots.replica_exists, "replica"),
    ] {
        let inside = if exists {
            place.is_within(&Place::of(root).map_err(|e| Error::io(root, e))?)
        } else {
            // Nothing below a missing replica exists: the file is inside it when both paths
            // leave the same directory by the same missing names.
            let (root_base, root_missing) = existing_prefix(root);
            let root_place = Place::of(root_base).map_err(|e| Error::io(root_base, e))?;
            place.is_same(&root_place) && missing.starts_with(&root_missing)
        };
        if inside {
            let resolved = if file.as_path() == given {
                String::new()
            } else {
                format!(" (which leads to {})", file.display())
            };
            let fate = match name {
                "source" => "it would be copied into the replica with the tree",
                _ => "the sync would delete or overwrite it, as anything not in the source",
            };
            return Err(bad(format!(
                "the {what} {}{resolved} is inside the {name} {}; {fate}; put it elsewhere",
                given.display(),
                root.display()
            )));
        }
    }
    Ok(file)
}

/// Where the index of a replica lives by default: the user's state directory, one file per
/// canonical replica path.
pub fn default_index(replica: &Path) -> Result<PathBuf> {
    // The XDG base directory specification: a relative path in the variable is ignored.
    let xdg = std::env::var_os("XDG_STATE_HOME").filter(|v| Path::new(v).is_absolute());
    let base = match xdg {
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
