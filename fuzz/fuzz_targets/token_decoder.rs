//! Every decoder that reads bytes from outside: token text, COSE envelopes, CWT claims, the
//! status list, gift-code input. None may panic, whatever it is fed.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tillkey::retail::fuzz_decoders(data);
});
