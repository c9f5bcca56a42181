//! ferry's transfer layer: the wire protocol and its QUIC transport.
//!
//! - [`proto`]: typed, versioned messages, their framing and the session
//!   logic — no sockets, no clock, tested in memory.
//! - [`auth`]: tokens kept hashed, read/write name-prefix scopes.
//! - [`server`] (`ferry serve`) and [`client`] (pull, list, gc, rm) and
//!   [`push`] (including uploads that overlap a running stash): thin quinn
//!   glue that moves frames between QUIC streams and the store.
//! - [`config`]: the server's TOML configuration; [`tls`]: certificates,
//!   pinning; [`metrics`]: Prometheus counters.
//!
//! A push sends only the chunks the server lacks and commits the name
//! last; a pull fetches only the chunks the local store (the node's cache)
//! lacks. Both resume where an interrupted run stopped. See
//! `docs/remote.md`.
#![deny(missing_docs)]

pub mod auth;
pub mod client;
pub mod config;
pub mod delta;
pub mod metrics;
pub mod proto;
pub mod push;
pub mod server;
pub mod tls;
mod udp;
pub mod unstash;
mod wire;

pub use client::{pull, push, Options, PullReport, PushReport, Remote, TransferStats};
pub use config::ServerConfig;
pub use server::{Server, ServerHandle};
