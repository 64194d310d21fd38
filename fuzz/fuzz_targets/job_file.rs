//! See `swarmrun::fuzzing::job_file` for what must hold.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| swarmrun::fuzzing::job_file(data));
