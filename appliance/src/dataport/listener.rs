//! [`DataPort`]: binds the address, runs the accept thread (one thread per connection, the
//! handshake limits applied before each), and shuts everything down.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use engine::port::Status;

use super::close::refuse_without_blocking;
use super::config::{DataPortConfig, DataPortError, DataPortStats};
use super::conn::{Conn, ConnSlot, Phase, PortHandle, PortShared, stats_of};
use super::handshake::serve_connection;
use super::registry::ItemRegistry;

/// The data port: a listener and its connection threads.
pub struct DataPort {
    local_addr: SocketAddr,
    shared: Arc<PortShared>,
    accept_thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for DataPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataPort")
            .field("local_addr", &self.local_addr)
            .field("stats", &self.stats())
            .finish()
    }
}

impl DataPort {
    /// Binds `addr` (port 0 picks a free port) and starts accepting.
    pub fn bind(
        addr: SocketAddr,
        registry: Arc<dyn ItemRegistry>,
        config: DataPortConfig,
    ) -> Result<Self, DataPortError> {
        for (name, value) in [
            ("max_sessions", config.max_sessions),
            ("max_handshakes", config.max_handshakes),
            ("max_handshakes_per_ip", config.max_handshakes_per_ip),
        ] {
            if value == 0 {
                return Err(DataPortError::Config(format!("{name} must be at least 1")));
            }
        }
        for (name, value) in [
            ("handshake_timeout", config.handshake_timeout),
            ("idle_timeout", config.idle_timeout),
            ("write_timeout", config.write_timeout),
        ] {
            if value.is_zero() {
                return Err(DataPortError::Config(format!("{name} must be non-zero")));
            }
        }
        let listener =
            TcpListener::bind(addr).map_err(|source| DataPortError::Bind { addr, source })?;
        let local_addr = listener
            .local_addr()
            .map_err(|source| DataPortError::Bind { addr, source })?;
        let shared = Arc::new(PortShared {
            registry,
            config,
            shutting_down: AtomicBool::new(false),
            active: AtomicUsize::new(0),
            accepted: AtomicU64::new(0),
            refused_over_limit: AtomicU64::new(0),
            handshakes_dropped: AtomicU64::new(0),
            hash_memory_bytes: AtomicU64::new(0),
            sessions_started: AtomicU64::new(0),
            next_conn_id: AtomicU64::new(1),
            sockets: Mutex::new(HashMap::new()),
            threads: Mutex::new(Vec::new()),
        });
        let accept_thread = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("dataport-accept".into())
                .spawn(move || accept_loop(&shared, listener))
                .map_err(DataPortError::Thread)?
        };
        tracing::info!(%local_addr, "data port listening");
        Ok(Self {
            local_addr,
            shared,
            accept_thread: Some(accept_thread),
        })
    }

    /// The address the port listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// A handle for the rest of the appliance (per-item session ends, counters).
    pub fn handle(&self) -> PortHandle {
        PortHandle(self.shared.clone())
    }

    /// Counters.
    pub fn stats(&self) -> DataPortStats {
        stats_of(&self.shared)
    }

    /// Stops accepting, ends every session after its current commit (with a
    /// [`CloseReason::ShuttingDown`] record carrying the durable sequence number) and joins
    /// every thread. Idempotent.
    pub fn shutdown(&mut self) {
        let Some(accept_thread) = self.accept_thread.take() else {
            return;
        };
        self.shared.shutting_down.store(true, Ordering::Release);
        // Wake the blocking accept with a connection of our own.
        let wake = wake_addr(self.local_addr);
        match TcpStream::connect_timeout(&wake, Duration::from_secs(1)) {
            Ok(_) => {
                if accept_thread.join().is_err() {
                    tracing::error!("the data port's accept thread panicked");
                }
            }
            Err(error) => {
                // The thread exits at its next accept; leave it rather than hang here.
                tracing::warn!(%error, "could not wake the data port's accept thread");
            }
        }
        for conn in self.shared.sockets().values() {
            conn.end();
        }
        let threads = std::mem::take(&mut *self.shared.threads());
        for thread in threads {
            if thread.join().is_err() {
                tracing::error!("a data port connection thread panicked");
            }
        }
        tracing::info!(local_addr = %self.local_addr, "data port stopped");
    }
}

impl Drop for DataPort {
    fn drop(&mut self) {
        self.shutdown();
    }
}

pub(super) fn wake_addr(local: SocketAddr) -> SocketAddr {
    let ip = match local.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, local.port())
}

pub(super) fn accept_loop(shared: &Arc<PortShared>, listener: TcpListener) {
    for incoming in listener.incoming() {
        if shared.stopping() {
            break;
        }
        let stream = match incoming {
            Ok(stream) => stream,
            Err(error) => {
                // EMFILE and the like: do not spin.
                tracing::warn!(%error, "data port accept failed");
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
        };
        shared.accepted.fetch_add(1, Ordering::AcqRel);
        shared.threads().retain(|t| !t.is_finished());
        // Unauthenticated connections never block anyone: a new one makes room by dropping the
        // oldest of its address (or of the address holding the most), so an agent's hello is
        // always read. Sessions have their own limit (`admit_session`).
        let peer_ip = stream.peer_addr().ok().map(|addr| addr.ip());
        shared.make_room_for_handshake(peer_ip);
        let id = shared.next_conn_id.fetch_add(1, Ordering::AcqRel);
        match stream.try_clone() {
            Ok(clone) => {
                shared.sockets().insert(
                    id,
                    Conn {
                        stream: clone,
                        item: None,
                        ended: Arc::new(AtomicBool::new(false)),
                        dropped: Arc::new(AtomicBool::new(false)),
                        peer_ip,
                        phase: Phase::Handshake,
                    },
                );
            }
            Err(error) => {
                refuse_without_blocking(
                    &stream,
                    Status::TooManyConnections,
                    &format!("cannot serve the connection: {error}"),
                );
                continue;
            }
        }
        shared.active.fetch_add(1, Ordering::AcqRel);
        let spawned = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name(format!("dataport-{id}"))
                .spawn(move || {
                    let _slot = ConnSlot {
                        shared: &shared,
                        id,
                    };
                    serve_connection(&shared, &stream, id);
                })
        };
        match spawned {
            Ok(handle) => shared.threads().push(handle),
            Err(error) => {
                tracing::warn!(%error, "cannot start a data port connection thread");
                // Bound first: in `if let` the `sockets` guard would be held across the write.
                let removed = shared.sockets().remove(&id);
                if let Some(conn) = removed {
                    refuse_without_blocking(
                        &conn.stream,
                        Status::TooManyConnections,
                        &format!("cannot serve the connection: {error}"),
                    );
                }
                shared.active.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }
}
