//! Durable private files: a file written here is replaced whole or not at all, is on disk
//! when the call returns, and is readable by its owner only.
//!
//! How: the content goes to a temporary file beside the target (`<name>.tmp`, created with
//! the file's mode), which is synced, renamed over the target, and the directory synced so
//! the rename itself survives a crash. Keys, caches and state files of every sigil service
//! are written this way.
//!
//! A state file rewritten often (a floor, a cache record) is a [`slot::SlotFile`] instead:
//! two slots overwritten in turn, one data flush per write and no journal commit.
#![forbid(unsafe_code)]

mod durable;
pub mod slot;

pub use durable::{
    PRIVATE_DIR_MODE, PRIVATE_FILE_MODE, create_private, create_private_dir, temp_path,
    write_private, write_with_mode,
};
