//! The end-to-end suites of Outbox live in `tests/` (harness in `tests/common`); the load generator in `src/bin/outbox-bench.rs`.
