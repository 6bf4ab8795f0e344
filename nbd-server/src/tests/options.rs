//! Handshake tests: client flags, each option, and the handshake limits.

use std::io::{Read, Write};
use std::sync::Arc;

use super::*;

#[test]
fn unknown_client_flags_end_the_connection() {
    let raw = Raw::start(catalog(mem(false), false), Limits::default()).flags(1 << 5);
    let err = raw.end().unwrap_err();
    assert!(err.to_string().contains("unknown bits 0x20"), "{err}");
}

#[test]
fn abort_is_acknowledged() {
    let mut raw = Raw::new(mem(false));
    let r = raw.ask(OPT_ABORT, &[]);
    assert_eq!(r[0].kind, REP_ACK);
    assert_eq!(raw.end().unwrap(), SessionEnd::Aborted);
}

#[test]
fn hang_up_during_handshake_is_an_io_error() {
    let raw = Raw::new(mem(false));
    assert!(matches!(raw.end(), Err(SessionError::Io(_))));
}

#[test]
fn list_is_refused_by_policy_when_names_are_secret() {
    let mut raw = Raw::new(mem(false));
    let r = raw.ask(OPT_LIST, &[]);
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].kind, REP_ERR_POLICY);
    assert!(!r[0].data.is_empty(), "a refusal says why");
}

#[test]
fn list_names_exports_when_allowed_and_refuses_data() {
    let mut raw = Raw::start(catalog(mem(false), true), Limits::default()).flags(1);
    let r = raw.ask(OPT_LIST, &[]);
    assert_eq!(r.len(), 2);
    assert_eq!(r[0].kind, REP_SERVER);
    assert_eq!(r[0].data, [&4u32.to_be_bytes()[..], b"disk"].concat());
    assert_eq!(r[1].kind, REP_ACK);
    let r = raw.ask(OPT_LIST, b"x");
    assert_eq!(r[0].kind, REP_ERR_INVALID);
}

#[test]
fn info_sends_export_name_description_block_size_and_stays_in_handshake() {
    let export = Arc::new(
        MemoryExport::new(SIZE, true)
            .unwrap()
            .with_block_sizes(BlockSizes {
                minimum_bytes: 512,
                preferred_bytes: 4096,
                maximum_bytes: 1 << 20,
            }),
    );
    let mut raw = Raw::new(export);
    let r = raw.ask(
        OPT_INFO,
        &go_data("disk", &[INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE]),
    );
    assert_eq!(r.last().unwrap().kind, REP_ACK);
    let info = |t: u16| {
        r.iter()
            .find(|x| x.kind == REP_INFO && x.data[..2] == t.to_be_bytes())
    };
    let e = info(INFO_EXPORT).unwrap();
    assert_eq!(e.data.len(), 12);
    let flags = u16::from_be_bytes([e.data[10], e.data[11]]);
    assert_eq!(
        flags,
        FLAG_HAS_FLAGS | FLAG_READ_ONLY | FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_CAN_MULTI_CONN
    );
    assert_eq!(&info(INFO_NAME).unwrap().data[2..], b"disk");
    assert!(String::from_utf8_lossy(&info(INFO_DESCRIPTION).unwrap().data[2..]).contains("memory"));
    let b = &info(INFO_BLOCK_SIZE).unwrap().data;
    assert_eq!(b.len(), 14);
    let field = |i: usize| u32::from_be_bytes(b[i..i + 4].try_into().unwrap());
    assert_eq!((field(2), field(6), field(10)), (512, 4096, 1 << 20));
    // Still negotiating: another option is answered.
    assert_eq!(raw.ask(OPT_STRUCTURED_REPLY, &[])[0].kind, REP_ACK);
}

#[test]
fn go_on_unknown_export_is_refused_and_negotiation_continues() {
    let mut raw = Raw::new(mem(false));
    let r = raw.ask(OPT_GO, &go_data("nope", &[]));
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].kind, REP_ERR_UNKNOWN);
    let flags = raw.go("disk");
    assert_eq!(flags & FLAG_SEND_DF, 0, "DF only with structured replies");
    assert_eq!(
        flags & (FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES),
        FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES
    );
}

#[test]
fn go_with_malformed_data_is_invalid() {
    let mut raw = Raw::new(mem(false));
    // Name length past the data.
    let r = raw.ask(OPT_GO, &[0, 0, 0, 9, b'd']);
    assert_eq!(r[0].kind, REP_ERR_INVALID);
    assert!(String::from_utf8_lossy(&r[0].data).contains("export name"));
    // Trailing bytes after the information requests.
    let mut d = go_data("disk", &[]);
    d.push(0);
    assert_eq!(raw.ask(OPT_GO, &d)[0].kind, REP_ERR_INVALID);
    // Not UTF-8.
    assert_eq!(
        raw.ask(OPT_GO, &[0, 0, 0, 1, 0xff, 0, 0])[0].kind,
        REP_ERR_INVALID
    );
}

#[test]
fn export_name_enters_transmission_with_or_without_zeroes() {
    for (client_flags, zeroes) in [
        (FLAG_C_FIXED_NEWSTYLE, 124),
        (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES, 0),
    ] {
        let mut raw = Raw::start(catalog(mem(false), false), Limits::default()).flags(client_flags);
        raw.option(OPT_EXPORT_NAME, b"disk");
        let mut reply = vec![0u8; 10 + zeroes];
        raw.s.read_exact(&mut reply).unwrap();
        assert_eq!(u64::from_be_bytes(reply[..8].try_into().unwrap()), SIZE);
        assert!(reply[10..].iter().all(|b| *b == 0));
        raw.request(0, CMD_DISC, 1, 0, 0);
        assert_eq!(raw.end().unwrap(), SessionEnd::Disconnected);
    }
}

#[test]
fn export_name_of_unknown_export_ends_the_session() {
    let mut raw = Raw::new(mem(false));
    raw.option(OPT_EXPORT_NAME, b"nope");
    let err = raw.end().unwrap_err();
    assert!(
        err.to_string().contains("EXPORT_NAME names no export"),
        "{err}"
    );
}

#[test]
fn unknown_starttls_and_extended_headers_are_unsupported() {
    let mut raw = Raw::new(mem(false));
    for opt in [OPT_STARTTLS, OPT_EXTENDED_HEADERS, 4, 12, 0xdead] {
        let r = raw.ask(opt, b"abc");
        assert_eq!(r[0].kind, REP_ERR_UNSUP, "option {opt}");
        assert!(!r[0].data.is_empty());
    }
    raw.go("disk");
}

#[test]
fn structured_reply_with_data_is_invalid() {
    let mut raw = Raw::new(mem(false));
    assert_eq!(raw.ask(OPT_STRUCTURED_REPLY, b"x")[0].kind, REP_ERR_INVALID);
}

#[test]
fn meta_context_needs_structured_replies() {
    let mut raw = Raw::new(mem(false));
    let r = raw.set_meta("disk", &["base:allocation"]);
    assert_eq!(r[0].kind, REP_ERR_INVALID);
    let r = raw.ask(OPT_LIST_META_CONTEXT, &meta_data("disk", &[]));
    assert_eq!(r[0].kind, REP_ERR_INVALID);
}

#[test]
fn list_meta_context_offers_base_allocation_only() {
    let mut raw = Raw::new(mem(false));
    raw.structured();
    for queries in [
        &[][..],
        &["base:"][..],
        &["base:allocation", "qemu:dirty-bitmap:x"][..],
    ] {
        let r = raw.ask(OPT_LIST_META_CONTEXT, &meta_data("disk", queries));
        assert_eq!(r.len(), 2, "{queries:?}");
        assert_eq!(r[0].kind, REP_META_CONTEXT);
        assert_eq!(&r[0].data[4..], b"base:allocation");
        assert_eq!(r[1].kind, REP_ACK);
    }
    let r = raw.ask(
        OPT_LIST_META_CONTEXT,
        &meta_data("disk", &["qemu:allocation-depth"]),
    );
    assert_eq!((r.len(), r[0].kind), (1, REP_ACK));
    let r = raw.ask(OPT_LIST_META_CONTEXT, &meta_data("nope", &[]));
    assert_eq!(r[0].kind, REP_ERR_UNKNOWN);
    let r = raw.ask(OPT_LIST_META_CONTEXT, &meta_data("disk", &["nocolon"]));
    assert_eq!(r[0].kind, REP_ERR_INVALID);
}

#[test]
fn set_meta_context_selects_with_an_id_and_block_status_uses_it() {
    let export = mem(false);
    let mut raw = Raw::new(Arc::clone(&export));
    raw.structured();
    let r = raw.set_meta("disk", &["base:", "base:allocation"]);
    assert_eq!(r.len(), 2);
    assert_eq!(r[0].kind, REP_META_CONTEXT);
    assert_eq!(
        u32::from_be_bytes(r[0].data[..4].try_into().unwrap()),
        BASE_ALLOCATION_ID
    );
    raw.go("disk");
    raw.request(0, CMD_BLOCK_STATUS, 7, 0, 4096);
    let c = raw.chunk();
    assert_eq!(c.kind, REPLY_TYPE_BLOCK_STATUS);
    assert_eq!(
        u32::from_be_bytes(c.data[..4].try_into().unwrap()),
        BASE_ALLOCATION_ID
    );
}

#[test]
fn meta_context_for_another_export_name_does_not_carry_over() {
    let export = mem(false);
    let cat = Arc::new(
        MemoryCatalog::new(false)
            .with("disk", export.clone())
            .with("other", export),
    );
    let mut raw = Raw::start(cat, Limits::default()).flags(1);
    raw.structured();
    assert_eq!(raw.set_meta("other", &["base:allocation"]).len(), 2);
    raw.go("disk");
    raw.request(0, CMD_BLOCK_STATUS, 7, 0, 4096);
    let (errno, msg) = raw.error_chunk(7);
    assert_eq!(errno, EINVAL);
    assert!(msg.contains("no metadata context"), "{msg}");
}

#[test]
fn too_many_options_end_the_connection() {
    let limits = Limits {
        max_options: 3,
        ..Limits::default()
    };
    let mut raw = Raw::start(catalog(mem(false), false), limits).flags(1);
    for _ in 0..3 {
        raw.ask(OPT_STRUCTURED_REPLY, &[]);
    }
    raw.option(OPT_STRUCTURED_REPLY, &[]);
    let err = raw.end().unwrap_err();
    assert!(err.to_string().contains("more than 3 options"), "{err}");
}

#[test]
fn oversized_option_is_discarded_and_refused_too_big() {
    let limits = Limits {
        max_option_bytes: 100,
        ..Limits::default()
    };
    let mut raw = Raw::start(catalog(mem(false), false), limits).flags(1);
    let r = raw.ask(OPT_GO, &[0u8; 101]);
    assert_eq!(r[0].kind, REP_ERR_TOO_BIG);
    assert!(String::from_utf8_lossy(&r[0].data).contains("100-byte limit"));
    raw.go("disk");
}

#[test]
fn bad_option_magic_ends_the_connection() {
    let mut raw = Raw::new(mem(false));
    raw.s.write_all(&[0u8; 16]).unwrap();
    let err = raw.end().unwrap_err();
    assert!(err.to_string().contains("not IHAVEOPT"), "{err}");
}

#[test]
fn go_on_a_closed_export_is_unknown() {
    let export = mem(false);
    export.close();
    let mut raw = Raw::new(export);
    assert_eq!(
        raw.ask(OPT_GO, &go_data("disk", &[]))[0].kind,
        REP_ERR_UNKNOWN
    );
}
