#![no_main]
//! `tickshard_fuzz::input` under libFuzzer.
libfuzzer_sys::fuzz_target!(|data: &[u8]| tickshard_fuzz::input(data));
