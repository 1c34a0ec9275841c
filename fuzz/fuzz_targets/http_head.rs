//! Fuzz target `http_head`: see `ferry::fuzzing::http_head` and fuzz/README.md for what it asserts.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ferry::fuzzing::http_head(data));
