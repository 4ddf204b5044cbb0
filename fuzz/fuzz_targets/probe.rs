#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tessera_engine::fuzzing::probe_and_plan(data));
