//! Hot-path benchmarks (filled in by the benchmarks work).
fn main() {}
