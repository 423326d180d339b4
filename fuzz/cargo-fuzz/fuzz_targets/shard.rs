#![no_main]
//! `tickshard_fuzz::shard` under libFuzzer.
//!
//! libfuzzer-sys makes every panic abort, even one the server catches. The run may press
//! `faulty-arena`'s fault button, whose panic the server is built to catch (the room ends,
//! the shard goes on): that one panic is let through quietly; any other still aborts.
libfuzzer_sys::fuzz_target!(
    init: {
        let abort_on_others = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let message = info
                .payload()
                .downcast_ref::<String>()
                .map(String::as_str)
                .unwrap_or_default();
            if !message.starts_with("faulty-arena: a player pressed the fault button") {
                abort_on_others(info);
            }
        }));
    },
    |data: &[u8]| tickshard_fuzz::shard(data)
);
