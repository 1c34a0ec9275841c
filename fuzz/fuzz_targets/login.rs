//! Fuzz target `login`: see `ferry::fuzzing::login` and fuzz/README.md for what it asserts.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ferry::fuzzing::login(data));
