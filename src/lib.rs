//! dirsync keeps a replica directory an exact copy of a source directory.
//!
//! Layering, bottom up (a module uses only modules below it):
//! - [`entry`], [`error`], [`hash`]: the data model (with the one stat conversion), errors,
//!   hashing.
//! - [`index`] (the only user of redb), [`scan`] (walks a local tree), [`source`] (trait
//!   `Source`: where a pass reads from), [`replica`] (trait `Replica`: the only writer to the
//!   destination; owns the temporary-name prefix), [`nesting`] (whether one directory is
//!   inside another).
//! - [`diff`] and [`plan`]: pure functions from two trees to an ordered list of operations.
//! - [`merge`]: scans both trees at once in bounded memory, keeping what may differ.
//! - [`event`]: the typed events of a pass and the sinks that render them; [`oplog`], the log
//!   file, is one; [`apply`] runs a plan and tells a sink what each operation did.
//! - [`engine`]: one pass over any `Source` and `Replica`.
//! - [`sync`], [`watch`], [`verify`], [`report`]: the commands; [`config`] validates their input.
//!
//! See `docs/ARCHITECTURE.md` for the data flow, the index schema and the invariants.

// Output goes through writes that report failure: `println!`/`eprintln!` panic on a closed
// or full stream, which would end a sync halfway and leave its index needing a repair.
#![cfg_attr(not(test), deny(clippy::print_stdout, clippy::print_stderr))]

pub mod apply;
pub mod config;
pub mod diff;
pub mod engine;
pub mod entry;
pub mod error;
pub mod event;
pub mod hash;
pub mod index;
pub mod merge;
pub mod nesting;
pub mod oplog;
pub mod plan;
pub mod replica;
pub mod report;
pub mod scan;
pub mod source;
pub mod sync;
pub mod verify;
pub mod watch;
