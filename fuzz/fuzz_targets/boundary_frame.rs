//! See `swarmrun::fuzzing::boundary_frame` for what must hold.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| swarmrun::fuzzing::boundary_frame(data));
