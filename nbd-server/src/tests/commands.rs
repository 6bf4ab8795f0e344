//! Transmission tests: each command, its checks, and simple vs structured replies.

use std::io::{ErrorKind, Write};
use std::sync::atomic::Ordering;

use super::*;

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn write(raw: &mut Raw, flags: u16, cookie: u64, offset: u64, data: &[u8]) {
    raw.request(flags, CMD_WRITE, cookie, offset, data.len() as u32);
    raw.s.write_all(data).unwrap();
}

#[test]
fn simple_write_then_read_round_trips() {
    let (mut raw, export) = session(false, false);
    let data = pattern(8192, 3);
    write(&mut raw, CMD_FLAG_FUA, 1, 4096, &data);
    assert_eq!(raw.simple(0), (0, 1, vec![]));
    raw.request(0, CMD_READ, 2, 4096, 8192);
    let (err, cookie, got) = raw.simple(8192);
    assert_eq!((err, cookie), (0, 2));
    assert_eq!(got, data);
    assert_eq!(&export.snapshot()[4096..12288], &data[..]);
    raw.request(0, CMD_DISC, 3, 0, 0);
    assert_eq!(raw.end().unwrap(), SessionEnd::Disconnected);
}

#[test]
fn structured_read_is_one_offset_data_chunk() {
    let (mut raw, export) = session(false, true);
    export.fill(1000, b"hello").unwrap();
    raw.request(CMD_FLAG_DF, CMD_READ, 9, 998, 9);
    let c = raw.chunk();
    assert_eq!(
        (c.kind, c.flags, c.cookie),
        (REPLY_TYPE_OFFSET_DATA, REPLY_FLAG_DONE, 9)
    );
    assert_eq!(u64::from_be_bytes(c.data[..8].try_into().unwrap()), 998);
    assert_eq!(&c.data[8..], b"\0\0hello\0\0");
}

#[test]
fn zero_length_read_and_write_succeed() {
    let (mut raw, _e) = session(false, true);
    raw.request(0, CMD_READ, 1, 0, 0);
    let c = raw.chunk();
    assert_eq!(
        (c.kind, c.flags, c.data.len()),
        (REPLY_TYPE_NONE, REPLY_FLAG_DONE, 0)
    );
    write(&mut raw, 0, 2, 0, &[]);
    assert_eq!(raw.simple(0).0, 0);
}

#[test]
fn read_past_the_end_is_einval_with_a_message() {
    let (mut raw, _e) = session(false, true);
    raw.request(0, CMD_READ, 4, SIZE - 512, 1024);
    let (errno, msg) = raw.error_chunk(4);
    assert_eq!(errno, EINVAL);
    assert!(msg.contains("past the export size"), "{msg}");
    // Offset overflow is the same refusal, not a panic.
    raw.request(0, CMD_READ, 5, u64::MAX - 10, 100);
    assert_eq!(raw.error_chunk(5).0, EINVAL);
    // The session goes on.
    raw.request(0, CMD_READ, 6, 0, 512);
    assert_eq!(raw.chunk().kind, REPLY_TYPE_OFFSET_DATA);
}

#[test]
fn read_past_the_end_simple_is_einval_without_payload() {
    let (mut raw, _e) = session(false, false);
    raw.request(0, CMD_READ, 4, SIZE, 512);
    assert_eq!(raw.simple(512), (EINVAL, 4, vec![]));
    raw.request(0, CMD_READ, 5, 0, 4);
    assert_eq!(raw.simple(4), (0, 5, vec![0; 4]));
}

#[test]
fn write_past_the_end_is_enospc_and_the_payload_is_skipped() {
    let (mut raw, export) = session(false, true);
    write(&mut raw, 0, 1, SIZE - 2, b"abcd");
    let (errno, _) = raw.error_chunk(1);
    assert_eq!(errno, ENOSPC);
    assert_eq!(export.write_calls.load(Ordering::Relaxed), 0);
    // Still in step: the next request is read as a request.
    write(&mut raw, 0, 2, 0, b"ok");
    assert_eq!(raw.simple(0), (0, 2, vec![]));
}

#[test]
fn oversized_requests_are_refused_and_writes_stay_in_step() {
    let export = mem(false);
    let limits = Limits {
        max_request_bytes: 4096,
        ..Limits::default()
    };
    let mut raw = Raw::start(catalog(export.clone(), false), limits).flags(1);
    raw.structured();
    raw.go("disk");
    raw.request(0, CMD_READ, 1, 0, 8192);
    let (errno, msg) = raw.error_chunk(1);
    assert_eq!(errno, EOVERFLOW);
    assert!(msg.contains("maximum payload 4096"), "{msg}");
    write(&mut raw, 0, 2, 0, &pattern(8192, 1));
    assert_eq!(raw.error_chunk(2).0, EINVAL);
    assert_eq!(export.write_calls.load(Ordering::Relaxed), 0);
    // TRIM and WRITE_ZEROES may exceed the payload limit.
    raw.request(0, CMD_WRITE_ZEROES, 3, 0, 65536);
    assert_eq!(raw.simple(0).0, 0);
}

#[test]
fn read_only_export_refuses_writes_with_eperm_without_calling_it() {
    let (mut raw, export) = session(true, true);
    write(&mut raw, 0, 1, 0, b"data");
    assert_eq!(raw.error_chunk(1).0, EPERM);
    raw.request(0, CMD_TRIM, 2, 0, 4096);
    assert_eq!(raw.error_chunk(2).0, EPERM);
    raw.request(CMD_FLAG_NO_HOLE, CMD_WRITE_ZEROES, 3, 0, 4096);
    assert_eq!(raw.error_chunk(3).0, EPERM);
    assert_eq!(export.write_calls.load(Ordering::Relaxed), 0);
    assert!(export.snapshot().iter().all(|b| *b == 0));
}

#[test]
fn flush_reaches_the_export_and_checks_its_fields() {
    let (mut raw, export) = session(false, false);
    raw.request(0, CMD_FLUSH, 1, 0, 0);
    assert_eq!(raw.simple(0), (0, 1, vec![]));
    assert_eq!(export.flush_calls.load(Ordering::Relaxed), 1);
    raw.request(0, CMD_FLUSH, 2, 0, 1);
    assert_eq!(raw.simple(0).0, EINVAL);
}

#[test]
fn trim_and_write_zeroes_make_holes_that_read_zero() {
    let (mut raw, export) = session(false, true);
    export.fill(0, &pattern(16384, 5)).unwrap();
    raw.request(CMD_FLAG_FUA, CMD_TRIM, 1, 0, 4096);
    assert_eq!(raw.simple(0).0, 0);
    raw.request(CMD_FLAG_NO_HOLE, CMD_WRITE_ZEROES, 2, 8192, 4096);
    assert_eq!(raw.simple(0).0, 0);
    let img = export.snapshot();
    assert!(img[..4096].iter().all(|b| *b == 0));
    assert_eq!(&img[4096..8192], &pattern(16384, 5)[4096..8192]);
    assert!(img[8192..12288].iter().all(|b| *b == 0));
    raw.request(0, CMD_WRITE_ZEROES, 3, SIZE, 4096);
    assert_eq!(raw.error_chunk(3).0, ENOSPC);
    raw.request(0, CMD_TRIM, 4, SIZE, 4096);
    assert_eq!(raw.error_chunk(4).0, EINVAL);
}

#[test]
fn block_status_reports_holes_and_data_in_order() {
    let (mut raw, export) = session(false, true);
    export.fill(8192, &[1; 4096]).unwrap();
    raw.request(0, CMD_BLOCK_STATUS, 1, 0, 16384);
    let c = raw.chunk();
    assert_eq!(
        (c.kind, c.flags, c.cookie),
        (REPLY_TYPE_BLOCK_STATUS, REPLY_FLAG_DONE, 1)
    );
    let descs: Vec<(u32, u32)> = c.data[4..]
        .chunks(8)
        .map(|d| {
            (
                u32::from_be_bytes(d[..4].try_into().unwrap()),
                u32::from_be_bytes(d[4..].try_into().unwrap()),
            )
        })
        .collect();
    let hz = STATE_HOLE | STATE_ZERO;
    assert_eq!(descs, vec![(8192, hz), (4096, 0), (4096, hz)]);
}

#[test]
fn block_status_req_one_sends_one_extent_within_the_length() {
    let (mut raw, _e) = session(false, true);
    raw.request(CMD_FLAG_REQ_ONE, CMD_BLOCK_STATUS, 1, 512, 1000);
    let c = raw.chunk();
    assert_eq!(c.data.len(), 12);
    assert_eq!(u32::from_be_bytes(c.data[4..8].try_into().unwrap()), 1000);
}

#[test]
fn block_status_without_a_context_or_past_the_end_is_einval() {
    let (mut raw, _e) = session(false, false);
    raw.request(0, CMD_BLOCK_STATUS, 1, 0, 512);
    assert_eq!(raw.simple(0).0, EINVAL);
    let (mut raw, _e) = session(false, true);
    raw.request(0, CMD_BLOCK_STATUS, 2, SIZE - 512, 1024);
    assert_eq!(raw.error_chunk(2).0, EINVAL);
}

#[test]
fn unknown_commands_and_flags_are_einval() {
    let (mut raw, _e) = session(false, true);
    raw.request(0, 99, 1, 0, 0);
    let (errno, msg) = raw.error_chunk(1);
    assert_eq!(errno, EINVAL);
    assert!(msg.contains("command 99"), "{msg}");
    raw.request(CMD_FLAG_REQ_ONE, CMD_READ, 2, 0, 512);
    assert_eq!(raw.error_chunk(2).0, EINVAL);
    // A write with a bad flag still has its payload skipped.
    write(&mut raw, CMD_FLAG_NO_HOLE, 3, 0, b"abc");
    assert_eq!(raw.error_chunk(3).0, EINVAL);
    raw.request(0, CMD_READ, 4, 0, 3);
    assert_eq!(&raw.chunk().data[8..], &[0, 0, 0]);
}

#[test]
fn df_on_a_simple_session_is_einval() {
    let (mut raw, _e) = session(false, false);
    raw.request(CMD_FLAG_DF, CMD_READ, 1, 0, 512);
    assert_eq!(raw.simple(512).0, EINVAL);
}

#[test]
fn unaligned_requests_are_einval_when_a_minimum_is_advertised() {
    let export = Arc::new(
        MemoryExport::new(SIZE, false)
            .unwrap()
            .with_block_sizes(BlockSizes {
                minimum_bytes: 512,
                preferred_bytes: 4096,
                maximum_bytes: 1 << 20,
            }),
    );
    let mut raw = Raw::new(export.clone());
    raw.structured();
    raw.go("disk");
    raw.request(0, CMD_READ, 1, 100, 512);
    let (errno, msg) = raw.error_chunk(1);
    assert_eq!(errno, EINVAL);
    assert!(msg.contains("minimum block size 512"), "{msg}");
    write(&mut raw, 0, 2, 0, &[1; 100]);
    assert_eq!(raw.error_chunk(2).0, EINVAL);
    assert_eq!(export.write_calls.load(Ordering::Relaxed), 0);
}

#[test]
fn export_errors_map_to_nbd_errors() {
    let cases = [
        (ErrorKind::PermissionDenied, EPERM),
        (ErrorKind::ReadOnlyFilesystem, EPERM),
        (ErrorKind::InvalidInput, EINVAL),
        (ErrorKind::StorageFull, ENOSPC),
        (ErrorKind::OutOfMemory, ENOMEM),
        (ErrorKind::Other, EIO),
        (ErrorKind::UnexpectedEof, EIO),
    ];
    let (mut raw, export) = session(false, true);
    for (i, (kind, errno)) in cases.into_iter().enumerate() {
        export.set_failing(Some(kind));
        raw.request(0, CMD_READ, i as u64, 0, 512);
        let (got, msg) = raw.error_chunk(i as u64);
        assert_eq!(got, errno, "{kind:?}");
        assert!(msg.contains("read failed"), "{msg}");
    }
    export.set_failing(Some(ErrorKind::StorageFull));
    write(&mut raw, 0, 50, 0, b"x");
    assert_eq!(raw.error_chunk(50).0, ENOSPC);
    raw.request(0, CMD_FLUSH, 51, 0, 0);
    assert_eq!(raw.error_chunk(51).0, ENOSPC);
    export.set_failing(None);
    raw.request(0, CMD_READ, 52, 0, 1);
    assert_eq!(raw.chunk().kind, REPLY_TYPE_OFFSET_DATA);
}

#[test]
fn a_closed_export_answers_eshutdown_and_ends_the_session() {
    let (mut raw, export) = session(false, true);
    export.close();
    raw.request(0, CMD_READ, 1, 0, 512);
    assert_eq!(raw.error_chunk(1).0, ESHUTDOWN);
    assert_eq!(raw.end().unwrap(), SessionEnd::ExportClosed);
}

#[test]
fn bad_request_magic_ends_the_session() {
    let (mut raw, _e) = session(false, true);
    raw.s.write_all(&[0u8; 28]).unwrap();
    let err = raw.end().unwrap_err();
    assert!(err.to_string().contains("NBD_REQUEST_MAGIC"), "{err}");
}

#[test]
fn hang_up_between_requests_ends_quietly() {
    let (raw, _e) = session(false, true);
    assert_eq!(raw.end().unwrap(), SessionEnd::HungUp);
}

/// An export whose block_status answers with a fixed list (to test what the server sends).
struct Extents {
    size_bytes: u64,
    list: Vec<crate::Extent>,
}

impl crate::Export for Extents {
    fn size_bytes(&self) -> u64 {
        self.size_bytes
    }
    fn read_only(&self) -> bool {
        true
    }
    fn block_sizes(&self) -> BlockSizes {
        BlockSizes::default()
    }
    fn read_at(&self, _: u64, out: &mut [u8]) -> std::io::Result<()> {
        out.fill(0);
        Ok(())
    }
    fn write_at(&self, _: u64, _: &[u8], _: bool) -> std::io::Result<()> {
        unreachable!("read-only")
    }
    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn trim(&self, _: u64, _: u64, _: bool) -> std::io::Result<()> {
        unreachable!("read-only")
    }
    fn write_zeroes(&self, _: u64, _: u64, _: bool) -> std::io::Result<()> {
        unreachable!("read-only")
    }
    fn block_status(&self, _: u64, _: u64, out: &mut Vec<crate::Extent>) -> std::io::Result<()> {
        out.extend_from_slice(&self.list);
        Ok(())
    }
}

fn status_of(
    size_bytes: u64,
    list: Vec<crate::Extent>,
    flags: u16,
    length: u32,
) -> Result<Vec<(u32, u32)>, u32> {
    status_with(Limits::default(), size_bytes, list, flags, length)
}

fn status_with(
    limits: Limits,
    size_bytes: u64,
    list: Vec<crate::Extent>,
    flags: u16,
    length: u32,
) -> Result<Vec<(u32, u32)>, u32> {
    let cat =
        Arc::new(MemoryCatalog::new(false).with("disk", Arc::new(Extents { size_bytes, list })));
    let mut raw = Raw::start(cat, limits).flags(1);
    raw.structured();
    assert_eq!(raw.set_meta("disk", &["base:allocation"]).len(), 2);
    let r = raw.ask(OPT_GO, &go_data("disk", &[]));
    assert_eq!(r.last().unwrap().kind, REP_ACK);
    let flags_sent = u16::from_be_bytes(r[0].data[10..12].try_into().unwrap());
    assert_eq!(
        flags_sent & FLAG_CAN_MULTI_CONN,
        0,
        "multi_conn() is false by default"
    );
    raw.request(flags, CMD_BLOCK_STATUS, 1, 0, length);
    let c = raw.chunk();
    if c.kind == REPLY_TYPE_ERROR {
        return Err(u32::from_be_bytes(c.data[..4].try_into().unwrap()));
    }
    assert_eq!((c.data.len() - 4) % 8, 0);
    Ok(c.data[4..]
        .chunks(8)
        .map(|d| {
            (
                u32::from_be_bytes(d[..4].try_into().unwrap()),
                u32::from_be_bytes(d[4..].try_into().unwrap()),
            )
        })
        .collect())
}

fn ext(length_bytes: u64, hole: bool) -> crate::Extent {
    crate::Extent {
        length_bytes,
        hole,
        zero: hole,
    }
}

#[test]
fn block_status_merges_equal_neighbours_and_stops_at_the_length() {
    let list = vec![
        ext(512, false),
        ext(512, false),
        ext(1024, true),
        ext(4096, false),
        ext(4096, true),
    ];
    let hz = STATE_HOLE | STATE_ZERO;
    assert_eq!(
        status_of(SIZE, list.clone(), 0, 2048),
        Ok(vec![(1024, 0), (1024, hz)])
    );
    // The last extent may run past the request, never past the export's end.
    assert_eq!(
        status_of(SIZE, list.clone(), 0, 2049),
        Ok(vec![(1024, 0), (1024, hz), (4096, 0)])
    );
    assert_eq!(
        status_of(6000, list.clone(), 0, 2049),
        Ok(vec![(1024, 0), (1024, hz), (3952, 0)])
    );
    // REQ_ONE: one descriptor, within the request, even when merging could grow it.
    assert_eq!(
        status_of(SIZE, list, CMD_FLAG_REQ_ONE, 700),
        Ok(vec![(700, 0)])
    );
}

#[test]
fn block_status_clamps_huge_extents_to_32_bits() {
    let list = vec![ext(1 << 39, true), ext(1 << 39, false)];
    let got = status_of(1 << 40, list, 0, u32::MAX).unwrap();
    assert_eq!(got, vec![(0xFFFF_0000, STATE_HOLE | STATE_ZERO)]);
}

#[test]
fn block_status_from_a_broken_export_is_eio() {
    assert_eq!(status_of(SIZE, vec![], 0, 4096), Err(EIO));
    assert_eq!(status_of(SIZE, vec![ext(0, true)], 0, 4096), Err(EIO));
}

#[test]
fn block_status_reply_stays_within_the_request_limit() {
    let list: Vec<_> = (0..2000).map(|i| ext(512, i % 2 == 0)).collect();
    let limits = Limits {
        max_request_bytes: 4096,
        ..Limits::default()
    };
    let got = status_with(limits, SIZE, list, 0, 1 << 20).unwrap();
    assert_eq!(
        got.len(),
        512,
        "4096-byte payload limit / 8 bytes per descriptor"
    );
}
