//! Fuzz target `config_file`: see `ferry::fuzzing::config_file` and fuzz/README.md for what it asserts.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ferry::fuzzing::config_file(data));
