//! The `device_opus` frontend's framing under arbitrary messages (see `voxgate::fuzzing::device_opus`): no
//! panic or overflow, gap fills within the session's budget.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| voxgate::fuzzing::device_opus(data));
