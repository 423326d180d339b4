#![no_main]
//! `tickshard_fuzz::snapshot` under libFuzzer.
libfuzzer_sys::fuzz_target!(|data: &[u8]| tickshard_fuzz::snapshot(data));
