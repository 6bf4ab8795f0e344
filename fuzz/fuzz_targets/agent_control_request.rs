//! Arbitrary bytes → one line of the source agent's control socket
//! (`source_agent::control::protocol::Request::parse`) and → its config file
//! (`source_agent::config::Config::parse`). Neither may panic; a request that parses must pass
//! or fail its own check with a message, and its answer deadline must be finite.

#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use source_agent::config::Config;
use source_agent::control::protocol::Request;

fuzz_target!(|data: &[u8]| {
    if let Ok(request) = Request::parse(data) {
        let _ = request.check();
        assert!(request.answer_within_secs() < u64::MAX);
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = Config::parse(text, Path::new("/fuzz/agent.toml"));
    }
});
