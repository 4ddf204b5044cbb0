#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tessera_operator::fuzzing::job_spec(data));
