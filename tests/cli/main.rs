//! Black-box tests of the `ferry` binary: one test binary, one module per area.
//!
//! Every test runs the real binary against its own temporary store (see
//! `util::Env`). Areas: byte-exact round trips (`roundtrip`), deduplication
//! (`dedup`), SIGKILL at random points (`crash`), several processes on one
//! store (`concurrency`), damaged stores (`corruption`), error handling
//! (`errors`), a full disk (`diskfull`), garbage collection and the cache
//! limit (`gc`), and the guided demo (`demo`).

mod concurrency;
mod corruption;
mod crash;
mod dedup;
mod demo;
mod diskfull;
mod errors;
mod gc;
mod roundtrip;
mod util;
