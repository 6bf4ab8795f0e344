//! Server tests: limits at accept and at GO, stop, and counters.

use std::net::TcpStream;
use std::time::Duration;

use super::*;
use crate::{Server, ServerConfig};

fn config() -> ServerConfig {
    ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..ServerConfig::default()
    }
}

/// Reads the greeting, then does GO on "disk" (true) or returns the refusal kind.
fn handshake(s: &mut TcpStream) -> Result<(), u32> {
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello).unwrap();
    go_after_hello(s)
}

fn go_after_hello(s: &mut TcpStream) -> Result<(), u32> {
    s.write_all(&1u32.to_be_bytes()).unwrap();
    let d = go_data("disk", &[]);
    let mut out = Vec::new();
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&OPT_GO.to_be_bytes());
    out.extend_from_slice(&(d.len() as u32).to_be_bytes());
    out.extend_from_slice(&d);
    s.write_all(&out).unwrap();
    loop {
        let mut h = [0u8; 20];
        s.read_exact(&mut h).unwrap();
        let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let mut data = vec![0; u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize];
        s.read_exact(&mut data).unwrap();
        if kind == REP_ACK {
            return Ok(());
        }
        if kind & (1 << 31) != 0 {
            return Err(kind);
        }
    }
}

/// True when the server closed the connection (EOF or reset) before sending anything.
fn closed_by_server(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 1];
    matches!(s.read(&mut b), Ok(0) | Err(_))
}

#[test]
fn sessions_beyond_max_connections_are_refused_at_go() {
    let cat = catalog(mem(false), false);
    let server = Server::start(
        ServerConfig {
            max_connections: 1,
            ..config()
        },
        cat,
    )
    .unwrap();
    let mut a = TcpStream::connect(server.local_addr()).unwrap();
    handshake(&mut a).unwrap();
    let mut b = TcpStream::connect(server.local_addr()).unwrap();
    assert_eq!(handshake(&mut b), Err(REP_ERR_SHUTDOWN));
    assert_eq!(server.stats().refused, 1);
    drop(a);
    drop(b);
    server.stop();
}

#[test]
fn handshakes_per_ip_are_limited_separately_from_sessions() {
    let cat = catalog(mem(false), false);
    let cfg = ServerConfig {
        max_handshaking_per_ip: 2,
        max_handshaking: 10,
        ..config()
    };
    let server = Server::start(cfg, cat).unwrap();
    // Two established sessions do not count against the handshake limit.
    let mut sessions = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(server.local_addr()).unwrap();
        handshake(&mut s).unwrap();
        sessions.push(s);
    }
    // Two idle handshakes fill the per-IP handshake limit...
    let mut idle = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(server.local_addr()).unwrap();
        let mut hello = [0u8; 18];
        s.read_exact(&mut hello).unwrap();
        idle.push(s);
    }
    // ...so the next connection is closed at once.
    let mut third = TcpStream::connect(server.local_addr()).unwrap();
    assert!(closed_by_server(&mut third));
    assert_eq!(server.stats().refused, 1);
    // Finishing one idle handshake frees its slot for a real client.
    let mut first = idle.remove(0);
    go_after_hello(&mut first).unwrap();
    let mut fresh = TcpStream::connect(server.local_addr()).unwrap();
    handshake(&mut fresh).unwrap();
    server.stop();
}

#[test]
fn handshake_timeout_closes_idle_sockets() {
    let cat = catalog(mem(false), false);
    let cfg = ServerConfig {
        handshake_timeout: Duration::from_millis(50),
        ..config()
    };
    let server = Server::start(cfg, cat).unwrap();
    let mut s = TcpStream::connect(server.local_addr()).unwrap();
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello).unwrap();
    // Never send client flags: the server gives up (the read waits for as long as it takes).
    assert!(closed_by_server(&mut s));
    server.stop();
}

#[test]
fn stop_closes_established_sessions_and_counts() {
    let export = mem(false);
    let server = Server::start(config(), catalog(export, false)).unwrap();
    let mut s = TcpStream::connect(server.local_addr()).unwrap();
    handshake(&mut s).unwrap();
    let mut req = Vec::new();
    req.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    req.extend_from_slice(&0u16.to_be_bytes());
    req.extend_from_slice(&CMD_READ.to_be_bytes());
    req.extend_from_slice(&1u64.to_be_bytes());
    req.extend_from_slice(&0u64.to_be_bytes());
    req.extend_from_slice(&512u32.to_be_bytes());
    s.write_all(&req).unwrap();
    let mut reply = [0u8; 16 + 512];
    s.read_exact(&mut reply).unwrap();
    let stats = server.stats();
    assert_eq!((stats.connections_now, stats.connections_total), (1, 1));
    assert_eq!((stats.requests, stats.read_bytes), (1, 512));
    server.stop();
    assert!(closed_by_server(&mut s));
}

#[test]
fn disconnect_shuts_down_the_sessions_of_one_export() {
    let export = mem(false);
    let cat = Arc::new(
        MemoryCatalog::new(false)
            .with("disk", export.clone())
            .with("other", export),
    );
    let server = Server::start(config(), cat).unwrap();
    let mut a = TcpStream::connect(server.local_addr()).unwrap();
    handshake(&mut a).unwrap();
    let mut b = TcpStream::connect(server.local_addr()).unwrap();
    let mut hello = [0u8; 18];
    b.read_exact(&mut hello).unwrap();
    b.write_all(&1u32.to_be_bytes()).unwrap();
    let d = go_data("other", &[]);
    let mut out = Vec::new();
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&OPT_GO.to_be_bytes());
    out.extend_from_slice(&(d.len() as u32).to_be_bytes());
    out.extend_from_slice(&d);
    b.write_all(&out).unwrap();
    loop {
        let mut h = [0u8; 20];
        b.read_exact(&mut h).unwrap();
        let mut data = vec![0; u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize];
        b.read_exact(&mut data).unwrap();
        if u32::from_be_bytes(h[12..16].try_into().unwrap()) == REP_ACK {
            break;
        }
    }
    // The session's export name is recorded just after the ACK: a FLUSH round trip orders it.
    flush_round_trip(&mut a);
    flush_round_trip(&mut b);
    assert_eq!(server.disconnect("disk"), 1);
    assert!(closed_by_server(&mut a));
    assert_eq!(server.disconnect("nope"), 0);
    // b (on "other") still works.
    flush_round_trip(&mut b);
    server.stop();
}

/// A FLUSH and its (successful, simple) reply.
fn flush_round_trip(s: &mut TcpStream) {
    let mut req = Vec::new();
    req.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    req.extend_from_slice(&0u16.to_be_bytes());
    req.extend_from_slice(&CMD_FLUSH.to_be_bytes());
    req.extend_from_slice(&[0u8; 20]);
    s.write_all(&req).unwrap();
    let mut reply = [0u8; 16];
    s.read_exact(&mut reply).unwrap();
    assert_eq!(
        u32::from_be_bytes(reply[4..8].try_into().unwrap()),
        0,
        "flush failed"
    );
}

/// A session counts once it is past GO, for its export's name only, and stops counting once
/// it is disconnected.
#[test]
fn sessions_are_counted_per_export_name() {
    let server = Server::start(config(), catalog(mem(false), false)).unwrap();
    let counter = server.disconnector();
    let mut s = TcpStream::connect(server.local_addr()).unwrap();
    handshake(&mut s).unwrap();
    // The session's thread records its export right after the ACK the client has read.
    let wait_for = |want: usize| {
        let mut n = counter.sessions("disk");
        for _ in 0..2000 {
            if n == want {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
            n = counter.sessions("disk");
        }
        n
    };
    assert_eq!(wait_for(1), 1);
    assert_eq!(counter.sessions("other"), 0);
    assert_eq!(counter.disconnect("disk"), 1);
    assert!(closed_by_server(&mut s));
    // The session's thread removes it after its socket closed.
    assert_eq!(wait_for(0), 0);
    server.stop();
}
