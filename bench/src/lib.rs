//! Sluice's benchmarks. The criterion benches in `benches/` measure control's per-connection CPU
//! costs (startup parsing, IAM token minting); the end-to-end harness against a direct connection
//! and peer proxies arrives with the data plane. Results and the commands behind them are in
//! `bench/RESULTS.md`.
