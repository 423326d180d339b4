#![no_main]
//! `tickshard_fuzz::control` under libFuzzer.
libfuzzer_sys::fuzz_target!(|data: &[u8]| tickshard_fuzz::control(data));
