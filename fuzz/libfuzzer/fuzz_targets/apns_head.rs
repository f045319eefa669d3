//! libFuzzer entry for `courier_fuzz::apns_head`; the target itself (and what it asserts) lives in `fuzz/src`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| courier_fuzz::apns_head(data));
