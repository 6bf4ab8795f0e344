//! The TCP server: accept loop, connection and handshake limits, stop, and counters.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::handshake::{self, Outcome};
use crate::{Catalog, Counters, DEFAULT_HANDSHAKE_TIMEOUT, Limits, transmission};

/// Where and how much the server serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    /// Default 127.0.0.1:10809 (loopback: nothing outside the machine reaches it).
    pub listen: SocketAddr,
    /// Established sessions (after GO/EXPORT_NAME) at once; GO past it is refused.
    pub max_connections: u32,
    /// Connections still in the handshake at once; more are closed at accept.
    pub max_handshaking: u32,
    /// Connections in the handshake from one peer IP at once.
    pub max_handshaking_per_ip: u32,
    /// Whole-handshake time limit (from accept to GO); the connection is closed after it.
    pub handshake_timeout: Duration,
    pub max_options: u32,
    /// Longest option data read in the handshake (longer: discarded, `NBD_REP_ERR_TOO_BIG`).
    pub max_option_bytes: u32,
    pub max_request_bytes: u32,
}

impl Default for ServerConfig {
    fn default() -> Self {
        let limits = Limits::default();
        Self {
            listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 10809),
            max_connections: 64,
            max_handshaking: 32,
            max_handshaking_per_ip: 8,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            max_options: limits.max_options,
            max_option_bytes: limits.max_option_bytes,
            max_request_bytes: limits.max_request_bytes,
        }
    }
}

/// A snapshot of the server's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stats {
    /// Connections open now (handshaking + established).
    pub connections_now: u64,
    pub connections_total: u64,
    /// Connections closed at accept (handshake limits) or refused at GO (session limit).
    pub refused: u64,
    pub requests: u64,
    pub read_bytes: u64,
    pub written_bytes: u64,
}

#[derive(Debug, Default)]
struct Gauges {
    handshaking: u32,
    established: u32,
    per_ip: HashMap<IpAddr, u32>,
}

struct Shared {
    config: ServerConfig,
    catalog: Arc<dyn Catalog>,
    stopping: AtomicBool,
    gauges: Mutex<Gauges>,
    /// Every open connection (a clone of its socket and, once in transmission, its export's
    /// name) so stop and disconnect can shut it down.
    conns: Mutex<HashMap<u64, Conn>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    connections_total: AtomicU64,
    refused: AtomicU64,
    counters: Counters,
}

struct Conn {
    socket: TcpStream,
    export: Option<String>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A running NBD server. Dropping it stops it.
pub struct Server {
    shared: Arc<Shared>,
    local_addr: SocketAddr,
    listener: Arc<TcpListener>,
    accept: Option<JoinHandle<()>>,
}

/// Counts and disconnects the sessions of an export (see [`Server::disconnect`]); cheap to
/// clone, valid after the server stopped (it then finds no sessions).
#[derive(Clone)]
pub struct Disconnector {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Disconnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Disconnector").finish_non_exhaustive()
    }
}

impl Disconnector {
    /// Sessions on the export `name` now (established: past GO).
    pub fn sessions(&self, name: &str) -> usize {
        lock(&self.shared.conns)
            .values()
            .filter(|c| c.export.as_deref() == Some(name))
            .count()
    }

    /// Shuts down every session on the export `name`. Returns how many.
    pub fn disconnect(&self, name: &str) -> usize {
        let conns = lock(&self.shared.conns);
        let mut n = 0;
        for conn in conns.values().filter(|c| c.export.as_deref() == Some(name)) {
            let _ = conn.socket.shutdown(Shutdown::Both);
            n += 1;
        }
        n
    }
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("local_addr", &self.local_addr)
            .finish_non_exhaustive()
    }
}

impl Server {
    /// Binds `config.listen` and starts accepting on a thread of its own.
    pub fn start(config: ServerConfig, catalog: Arc<dyn Catalog>) -> io::Result<Server> {
        let listener = TcpListener::bind(config.listen).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("binding NBD listener {}: {e}", config.listen),
            )
        })?;
        let local_addr = listener.local_addr()?;
        let listener = Arc::new(listener);
        let shared = Arc::new(Shared {
            config,
            catalog,
            stopping: AtomicBool::new(false),
            gauges: Mutex::new(Gauges::default()),
            conns: Mutex::new(HashMap::new()),
            threads: Mutex::new(Vec::new()),
            connections_total: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            counters: Counters::default(),
        });
        let accept = {
            let shared = Arc::clone(&shared);
            let listener = Arc::clone(&listener);
            std::thread::Builder::new()
                .name("nbd-accept".into())
                .spawn(move || accept_loop(&shared, &listener))?
        };
        Ok(Server {
            shared,
            local_addr,
            listener,
            accept: Some(accept),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn stats(&self) -> Stats {
        let s = &self.shared;
        let g = lock(&s.gauges);
        Stats {
            connections_now: u64::from(g.handshaking) + u64::from(g.established),
            connections_total: s.connections_total.load(Ordering::Relaxed),
            refused: s.refused.load(Ordering::Relaxed),
            requests: s.counters.requests.load(Ordering::Relaxed),
            read_bytes: s.counters.read_bytes.load(Ordering::Relaxed),
            written_bytes: s.counters.written_bytes.load(Ordering::Relaxed),
        }
    }

    /// Shuts down every session on the export `name` (idle ones included: a removed export
    /// should not keep connections open until their next request). Returns how many.
    pub fn disconnect(&self, name: &str) -> usize {
        self.disconnector().disconnect(name)
    }

    /// A handle that disconnects an export's sessions, for the owner of the catalog.
    pub fn disconnector(&self) -> Disconnector {
        Disconnector {
            shared: self.shared.clone(),
        }
    }

    /// Closes the listener and every connection, and joins every thread.
    pub fn stop(mut self) {
        self.stop_inner();
    }

    fn stop_inner(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        // shutdown(2) on a listening socket wakes a blocked accept(2) on Linux.
        // SAFETY: the fd is owned by `self.listener`, alive for this call.
        unsafe {
            libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR);
        }
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        for (_, conn) in lock(&self.shared.conns).drain() {
            let _ = conn.socket.shutdown(Shutdown::Both);
        }
        let threads = std::mem::take(&mut *lock(&self.shared.threads));
        for t in threads {
            let _ = t.join();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.accept.is_some() {
            self.stop_inner();
        }
    }
}

fn accept_loop(shared: &Arc<Shared>, listener: &TcpListener) {
    let mut next_id: u64 = 0;
    loop {
        let accepted = listener.accept();
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        let (stream, peer) = match accepted {
            Ok(a) => a,
            // EMFILE and friends: the connection stays queued; try again a little later.
            Err(_) => {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        shared.connections_total.fetch_add(1, Ordering::Relaxed);
        let ip = peer.ip();
        {
            let mut g = lock(&shared.gauges);
            let from_ip = g.per_ip.get(&ip).copied().unwrap_or(0);
            if g.handshaking >= shared.config.max_handshaking
                || from_ip >= shared.config.max_handshaking_per_ip
            {
                drop(g);
                shared.refused.fetch_add(1, Ordering::Relaxed);
                let _ = stream.shutdown(Shutdown::Both);
                continue;
            }
            g.handshaking += 1;
            g.per_ip.insert(ip, from_ip + 1);
        }
        next_id += 1;
        let id = next_id;
        // Without a handle for stop to shut down, the connection is not served.
        match stream.try_clone() {
            Ok(clone) => {
                lock(&shared.conns).insert(
                    id,
                    Conn {
                        socket: clone,
                        export: None,
                    },
                );
            }
            Err(_) => {
                end_handshake(shared, ip);
                shared.refused.fetch_add(1, Ordering::Relaxed);
                let _ = stream.shutdown(Shutdown::Both);
                continue;
            }
        }
        let worker = Arc::clone(shared);
        let spawned = std::thread::Builder::new()
            .name("nbd-conn".into())
            .spawn(move || connection(&worker, stream, ip, id));
        let mut threads = lock(&shared.threads);
        threads.retain(|t| !t.is_finished());
        match spawned {
            Ok(t) => threads.push(t),
            Err(_) => {
                drop(threads);
                lock(&shared.conns).remove(&id);
                end_handshake(shared, ip);
                shared.refused.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

fn end_handshake(shared: &Shared, ip: IpAddr) {
    release_handshake(&mut lock(&shared.gauges), ip);
}

fn release_handshake(g: &mut Gauges, ip: IpAddr) {
    g.handshaking = g.handshaking.saturating_sub(1);
    if let Some(n) = g.per_ip.get_mut(&ip) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            g.per_ip.remove(&ip);
        }
    }
}

/// A socket whose reads during the handshake share one deadline.
struct Deadlined {
    stream: TcpStream,
    deadline: Option<Instant>,
}

impl Read for Deadlined {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(deadline) = self.deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "handshake time limit",
                ));
            }
            self.stream.set_read_timeout(Some(left))?;
        }
        self.stream.read(buf)
    }
}

impl Write for Deadlined {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.stream.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.stream.flush()
    }
}

fn connection(shared: &Shared, stream: TcpStream, ip: IpAddr, id: u64) {
    let _ = stream.set_nodelay(true);
    let timeout = shared.config.handshake_timeout;
    let _ = stream.set_write_timeout(Some(timeout));
    let mut s = Deadlined {
        stream,
        deadline: Some(Instant::now() + timeout),
    };
    let limits = Limits {
        max_options: shared.config.max_options,
        max_option_bytes: shared.config.max_option_bytes,
        max_request_bytes: shared.config.max_request_bytes,
    };
    let mut admitted = false;
    let mut admit = || {
        let mut g = lock(&shared.gauges);
        if shared.stopping.load(Ordering::SeqCst) || g.established >= shared.config.max_connections
        {
            // Counted before the client hears the refusal.
            shared.refused.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        // From handshaking to established under one lock, before the client hears the ACK.
        g.established += 1;
        release_handshake(&mut g, ip);
        admitted = true;
        true
    };
    let outcome = handshake::negotiate(&mut s, shared.catalog.as_ref(), &limits, &mut admit);
    if !admitted {
        end_handshake(shared, ip);
    }
    if let Ok(Outcome::Transmit(negotiated)) = outcome {
        if let Some(conn) = lock(&shared.conns).get_mut(&id) {
            conn.export = Some(negotiated.name.clone());
        }
        s.deadline = None;
        let _ = s.stream.set_read_timeout(None);
        let _ = s.stream.set_write_timeout(None);
        let _ = transmission::transmit(&mut s, &negotiated, &shared.counters);
    }
    if admitted {
        let mut g = lock(&shared.gauges);
        g.established = g.established.saturating_sub(1);
    }
    let _ = s.stream.shutdown(Shutdown::Both);
    lock(&shared.conns).remove(&id);
}
