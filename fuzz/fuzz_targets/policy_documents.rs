#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| podnet_fuzz::check::policy_documents(data));
