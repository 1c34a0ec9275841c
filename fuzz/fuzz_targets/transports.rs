//! Fuzz target `transports`: see `ferry::fuzzing::transports` and fuzz/README.md for what it asserts.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ferry::fuzzing::transports(data));
