//! Fuzz target `client_hello`: see `ferry::fuzzing::client_hello` and fuzz/README.md for what it asserts.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ferry::fuzzing::client_hello(data));
