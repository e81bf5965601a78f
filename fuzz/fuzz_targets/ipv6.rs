#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| podnet_fuzz::check::ipv6(data));
