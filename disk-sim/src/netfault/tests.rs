//! Unit tests of the fault proxy: clean forwarding, one-shot faults on whole frames, drops,
//! plain fallback, held frames, delays.

#![allow(clippy::unwrap_used)]

use super::*;
use engine::delta::{
    DISK_ENTRY_BYTES, FRAME_HEADER_BYTES, FRAME_MAGIC, STREAM_HEADER_FIXED_BYTES, STREAM_MAGIC,
};

/// An upstream that records everything it receives per connection.
fn recorder() -> (SocketAddr, std::sync::mpsc::Receiver<Vec<u8>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let tx = tx.clone();
            std::thread::spawn(move || {
                let mut all = Vec::new();
                let _ = stream.read_to_end(&mut all);
                let _ = tx.send(all);
            });
        }
    });
    (addr, rx)
}

fn hello() -> Vec<u8> {
    let mut hello = vec![0u8; HELLO_FIXED_BYTES];
    hello[..4].copy_from_slice(&HELLO_MAGIC);
    hello[4] = 1;
    hello[6] = 1;
    hello[24] = 3;
    hello.extend_from_slice(b"tok");
    hello
}

fn stream_header() -> Vec<u8> {
    let mut header = vec![0u8; STREAM_HEADER_FIXED_BYTES];
    header[..8].copy_from_slice(&STREAM_MAGIC);
    header[12] = 1; // one disk
    header[14] = 2; // name of 2 bytes
    header.extend_from_slice(b"vm");
    header.extend_from_slice(&[0u8; DISK_ENTRY_BYTES]);
    header.extend_from_slice(&[0u8; 8]);
    header
}

fn frame(seq: u8, payload: usize) -> Vec<u8> {
    let mut frame = vec![0u8; FRAME_HEADER_BYTES];
    frame[..4].copy_from_slice(&FRAME_MAGIC);
    frame[8] = seq;
    frame[PAYLOAD_LEN_AT..PAYLOAD_LEN_AT + 4].copy_from_slice(&(payload as u32).to_le_bytes());
    frame.extend(std::iter::repeat_n(seq, payload));
    frame
}

fn send(proxy: &Proxy, bytes: &[u8]) {
    let mut stream = TcpStream::connect(proxy.local_addr()).unwrap();
    stream.write_all(bytes).unwrap();
    stream.shutdown(Shutdown::Write).unwrap();
    let mut sink = Vec::new();
    let _ = stream.read_to_end(&mut sink);
}

fn recv(rx: &std::sync::mpsc::Receiver<Vec<u8>>) -> Vec<u8> {
    rx.recv_timeout(Duration::from_secs(10)).unwrap()
}

#[test]
fn clean_proxy_forwards_every_byte() {
    let (upstream, rx) = recorder();
    let proxy = Proxy::start(upstream, FaultPlan::default()).unwrap();
    let mut bytes = [hello(), stream_header()].concat();
    for seq in 0..20 {
        bytes.extend(frame(seq, 1000 * usize::from(seq)));
    }
    send(&proxy, &bytes);
    assert_eq!(recv(&rx), bytes);
    let stats = proxy.stats();
    assert_eq!((stats.frames, stats.unframed), (20, 0));
}

#[test]
fn one_shot_duplicate_reorder_and_flip_hit_whole_frames() {
    let (upstream, rx) = recorder();
    let proxy = Proxy::start(upstream, FaultPlan::default()).unwrap();
    let head = [hello(), stream_header()].concat();
    let frames: Vec<Vec<u8>> = (0..4).map(|s| frame(s, 100)).collect();
    let bytes = [head.clone(), frames.concat()].concat();

    proxy.arm(NetFault::Duplicate);
    send(&proxy, &bytes);
    let expected = [
        head.clone(),
        frames[0].clone(),
        frames[0].clone(),
        frames[1..].concat(),
    ]
    .concat();
    assert_eq!(recv(&rx), expected);

    proxy.arm(NetFault::Reorder);
    send(&proxy, &bytes);
    let expected = [
        head.clone(),
        frames[1].clone(),
        frames[0].clone(),
        frames[2..].concat(),
    ]
    .concat();
    assert_eq!(recv(&rx), expected);

    proxy.arm(NetFault::Flip);
    send(&proxy, &bytes);
    let got = recv(&rx);
    assert_eq!(got.len(), bytes.len());
    let differing: Vec<usize> = (0..got.len()).filter(|&i| got[i] != bytes[i]).collect();
    assert_eq!(differing.len(), 1, "one byte flipped");
    let at = differing[0] - head.len();
    assert!(
        (4..frames[0].len()).contains(&at) && !(32..36).contains(&at),
        "{at}"
    );
    let stats = proxy.stats();
    assert_eq!((stats.duplicates, stats.reorders, stats.flips), (1, 1, 1));
}

#[test]
fn drop_after_bytes_cuts_the_connection_there() {
    let (upstream, rx) = recorder();
    let proxy = Proxy::start(upstream, FaultPlan::default()).unwrap();
    let bytes = [hello(), stream_header(), frame(0, 5000), frame(1, 5000)].concat();
    proxy.arm(NetFault::DropAfterBytes(200));
    send(&proxy, &bytes);
    assert_eq!(recv(&rx), bytes[..200]);
    assert_eq!(proxy.stats().drops, 1);
    // Disarmed after firing: the next connection is clean.
    send(&proxy, &bytes);
    assert_eq!(recv(&rx), bytes);
}

#[test]
fn odd_bytes_fall_back_to_plain_forwarding() {
    let (upstream, rx) = recorder();
    let proxy = Proxy::start(upstream, FaultPlan::default()).unwrap();
    let mut garbage = b"GET / HTTP/1.1\r\n\r\n".to_vec();
    garbage.extend(std::iter::repeat_n(0xffu8, 10_000));
    send(&proxy, &garbage);
    assert_eq!(recv(&rx), garbage);
    // A frame header claiming more than the limit: forwarded as it is.
    let mut bad = [hello(), stream_header()].concat();
    let mut huge = frame(0, 0);
    huge[PAYLOAD_LEN_AT..PAYLOAD_LEN_AT + 4].copy_from_slice(&u32::MAX.to_le_bytes());
    bad.extend(huge);
    proxy.arm(NetFault::Flip);
    send(&proxy, &bad);
    assert_eq!(recv(&rx), bad);
    assert_eq!(proxy.stats().flips, 0);
    assert_eq!(proxy.armed(), 1);
}

#[test]
fn a_held_frame_is_released_when_no_next_frame_comes() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let proxy = Proxy::start(listener.local_addr().unwrap(), FaultPlan::default()).unwrap();
    proxy.arm(NetFault::Reorder);
    let mut agent = TcpStream::connect(proxy.local_addr()).unwrap();
    let bytes = [hello(), stream_header(), frame(0, 10)].concat();
    agent.write_all(&bytes).unwrap();
    let (mut server, _) = listener.accept().unwrap();
    let mut got = vec![0u8; bytes.len()];
    server
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    server.read_exact(&mut got).unwrap();
    assert_eq!(got, bytes);
    assert_eq!(proxy.stats().reorders_released, 1);
    assert_eq!(proxy.armed(), 1, "the swap stays armed");
}

#[test]
fn standing_delay_slows_each_chunk() {
    let (upstream, rx) = recorder();
    let plan = FaultPlan {
        delay_up: Some(Delay::fixed(Duration::from_millis(20))),
        ..FaultPlan::default()
    };
    let proxy = Proxy::start(upstream, plan).unwrap();
    let bytes = [hello(), stream_header(), frame(0, 10), frame(1, 10)].concat();
    let started = Instant::now();
    send(&proxy, &bytes);
    assert_eq!(recv(&rx), bytes);
    assert!(started.elapsed() >= Duration::from_millis(80));
    assert_eq!(proxy.stats().delays, 4);
}
