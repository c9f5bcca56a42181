//! ferry's store: the chunking core and the content-addressed store on disk.
//!
//! Data flows `bytes → chunker → BLAKE3 → index lookup → zstd → pack`, and a
//! stash is recorded as a manifest (the recipe that rebuilds the bytes)
//! named by a ref. See `docs/ARCHITECTURE.md` for the whole picture.
#![deny(missing_docs)]

pub mod backend;
pub mod bench;
pub mod cache;
pub mod chunker;
pub mod compress;
mod direct;
pub mod dirtar;
mod gather;
pub mod gc;
pub mod id;
pub mod image;
pub mod import;
pub mod index;
pub mod layout;
pub mod lease;
pub mod manifest;
pub mod name;
pub mod pack;
pub mod place;
pub mod refs;
pub mod repo;
pub mod scratch;
pub mod tarsplit;

pub use id::{ChunkId, ManifestId, PackId};

#[cfg(any(test, feature = "test-support"))]
#[doc(hidden)]
pub mod testutil;
