//! See `swarmrun::fuzzing::wire_frames` for what must hold.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| swarmrun::fuzzing::wire_frames(data));
