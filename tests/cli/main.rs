//! Black-box tests of the `ferry` binary: one test binary, one module per area.
//!
//! Every test runs the real binary against its own temporary store (see
//! `util::Env`). Areas: byte-exact round trips (`roundtrip`), deduplication
//! (`dedup`), SIGKILL at random points (`crash`), SIGTERM, SIGINT and SIGHUP during an
//! unstash, and what a killed one leaves (`interrupt`), several processes on one
//! store (`concurrency`), damaged stores (`corruption`), error handling
//! (`errors`), a full disk (`diskfull`), hostile stashes, full disks
//! during stash and unstash and damaged store files (`faults`), garbage collection and the cache
//! limit (`gc`), the guided demo (`demo`), stash and unstash through a real
//! `ferry serve` process (`remote`), and docs/Jenkinsfile run against a
//! real server (`jenkins`), `ferry bench` and the chunking kernels (`bench`).

mod bench;
mod concurrency;
mod corruption;
mod crash;
mod dedup;
mod demo;
mod diskfull;
mod errors;
mod faults;
mod gc;
mod interrupt;
mod jenkins;
mod remote;
mod roundtrip;
mod util;
