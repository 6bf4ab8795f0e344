//! Unit tests of the agent: settings, backoff and hellos.

use std::net::SocketAddr;

use engine::delta::DiskGeometry;
use engine::port::{Mode, encode_hello};

use super::link::stream_hello;
use super::*;

#[test]
fn backoff_doubles_up_to_the_cap() {
    let mut config = AgentConfig::new(
        "127.0.0.1:1".parse().unwrap(),
        [0; 16],
        b"t",
        "x",
        vec![DiskGeometry {
            size_bytes: 4096,
            block_size_bytes: 4096,
        }],
    );
    config.backoff_initial = Duration::from_millis(10);
    config.backoff_max = Duration::from_millis(50);
    let delays: Vec<u128> = (1..6).map(|n| config.backoff(n).as_millis()).collect();
    assert_eq!(delays, vec![10, 20, 40, 50, 50]);
    assert!(config.validate().is_ok());
    config.token.clear();
    assert!(matches!(config.validate(), Err(AgentError::Config(_))));
}

#[test]
fn the_resync_setting_sets_the_flag_on_the_stream_hello() {
    let mut config = AgentConfig::new(
        "127.0.0.1:1".parse().unwrap(),
        *b"item-0123456789a",
        b"tok",
        "x",
        vec![DiskGeometry {
            size_bytes: 4096,
            block_size_bytes: 4096,
        }],
    );
    assert!(!config.resync);
    let plain = stream_hello(&config);
    assert_eq!(plain[7], 0);
    assert_eq!(
        plain,
        encode_hello(Mode::Stream, &config.item_id, b"tok", 0, 0)
    );
    config.resync = true;
    let resync = stream_hello(&config);
    assert_eq!(resync[7], engine::port::HELLO_FLAG_RESYNC);
    let mut fixed = [0u8; engine::port::HELLO_FIXED_BYTES];
    fixed.copy_from_slice(&resync[..engine::port::HELLO_FIXED_BYTES]);
    let head = engine::port::decode_hello_fixed(&fixed).unwrap();
    assert!(head.resync);
    assert_eq!(head.mode, Mode::Stream);
    assert!(format!("{config:?}").contains("resync: true"));
}

#[test]
fn resync_required_and_not_replicating_are_final_and_named() {
    let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
    let refused = |code: u8| AgentError::Refused {
        addr,
        status: RefusalStatus::from_u8(code),
        message: "m".into(),
    };
    assert!(refused(7).needs_resync());
    assert_eq!(
        refused(7).refusal_status(),
        Some(RefusalStatus::ResyncRequired)
    );
    assert!(!refused(16).needs_resync());
    assert_eq!(
        refused(16).refusal_status(),
        Some(RefusalStatus::NotReplicating)
    );
    assert!(refused(16).to_string().contains("not-replicating"));
    assert!(!RefusalStatus::NotReplicating.is_transient());
    assert!(!RefusalStatus::ResyncRequired.is_transient());
    let closed = AgentError::Closed {
        reason: CloseReason::ResyncRequired,
        message: "m".into(),
    };
    assert!(closed.needs_resync());
    assert_eq!(closed.refusal_status(), None);
    assert!(!AgentError::Stopped.needs_resync());
}

#[test]
fn unknown_codes_are_named_not_fatal_to_parse() {
    // The codes are engine::port's (tested there); these are the names this API exports.
    assert_eq!(RefusalStatus::from_u8(200), RefusalStatus::Other(200));
    assert_eq!(RefusalStatus::from_u8(5).to_string(), "bad-token");
    assert!(!CloseReason::from_u8(99).is_transient());
    assert!(CloseReason::from_u8(2).is_transient());
}
