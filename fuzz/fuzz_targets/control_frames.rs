//! Fuzz target `control_frames`: see `ferry::fuzzing::control_frames` and fuzz/README.md for what it asserts.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ferry::fuzzing::control_frames(data));
