//! ferry's transfer layer: the sans-IO wire protocol and its QUIC driver.
//!
//! Not implemented yet: see issue 4. The crate exists so the workspace has
//! the layout of `docs/ARCHITECTURE.md` from the start.
#![deny(missing_docs)]
