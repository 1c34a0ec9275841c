//! Fuzz target `http_requests`: see `ferry::fuzzing::http_requests` and fuzz/README.md for what it asserts.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ferry::fuzzing::http_requests(data));
