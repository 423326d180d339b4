#![no_main]
//! `tickshard_fuzz::frames` under libFuzzer.
libfuzzer_sys::fuzz_target!(|data: &[u8]| tickshard_fuzz::frames(data));
