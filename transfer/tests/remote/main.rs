//! Loopback tests of `ferry serve` and of remote stash / unstash: a real
//! server on 127.0.0.1 (ephemeral port) in every test, real stores in
//! temporary directories. One test binary, one module per area.

mod abuse;
mod concurrency;
mod early;
mod gc;
mod integrity;
mod operations;
mod resume;
mod roundtrip;
mod streaming;
mod trust;
mod util;
