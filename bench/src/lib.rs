//! Sluice's benchmarks. The criterion benches in `benches/` measure control's per-connection CPU
//! costs (startup parsing, IAM token minting) and the relay alone (splice against a userspace copy
//! loop); `src/bin/e2e.rs` is the end-to-end harness that runs pgbench and COPY against a direct
//! connection, Sluice and peer proxies in one interleaved run. Results and the commands behind them
//! are in `bench/RESULTS.md`.
