//! See `swarmrun::fuzzing::manifest` for what must hold.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| swarmrun::fuzzing::manifest(data));
