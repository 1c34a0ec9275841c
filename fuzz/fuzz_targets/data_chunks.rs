//! Fuzz target `data_chunks`: see `ferry::fuzzing::data_chunks` and fuzz/README.md for what it asserts.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ferry::fuzzing::data_chunks(data));
