//! libFuzzer entry for `courier_fuzz::jwt`; the target itself (and what it asserts) lives in `fuzz/src`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| courier_fuzz::jwt(data));
