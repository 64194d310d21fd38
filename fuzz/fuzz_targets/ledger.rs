//! See `swarmrun::fuzzing::ledger` for what must hold.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| swarmrun::fuzzing::ledger(data));
