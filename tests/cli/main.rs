//! Black-box tests of the `ferry` binary: one test binary, one module per area.
