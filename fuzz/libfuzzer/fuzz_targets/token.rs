//! libFuzzer entry for `courier_fuzz::token`; the target itself (and what it asserts) lives in `fuzz/src`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| courier_fuzz::token(data));
