//! The control API's connections: a cap, timeouts, and room for a new client at the cap.
//!
//! - **Cap.** At most [`ApiLimits::max_connections`] connections are open at once. When a
//!   new one arrives at the cap, the connection that has waited longest for a request (none
//!   of its requests in a handler: idle keep-alive, or headers still arriving) is closed to
//!   make room, so idle or half-sent connections can never lock a client out. Only when
//!   every connection has a request in a handler is the new one answered 503
//!   `too_many_connections` and closed.
//! - **Header timeout.** A request head must be complete within
//!   [`ApiLimits::header_timeout`] of the connection's accept or of the previous response
//!   (hyper's header-read timer starts when it waits for a head): this is also the idle
//!   keep-alive timeout. Half-sent requests are closed then.
//! - **Body timeout.** The body (at most 64 KiB) must arrive within
//!   [`ApiLimits::body_timeout`] of the head, else 408 `request_timeout` and the connection
//!   closes (`read_body_in_time` in `http/routes.rs`).
//! - **Write timeout.** A response write that makes no progress for
//!   [`ApiLimits::write_timeout`] (the client does not read) closes the connection.
//!
//! HTTP/1.1 only (hyper's http1 server); each connection is a tokio task.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{Notify, watch};

/// Connection limits of the control API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApiLimits {
    /// Connections open at once.
    pub max_connections: usize,
    /// A complete request head within this time of the accept or of the previous response.
    pub header_timeout: Duration,
    /// The whole body within this time of the head.
    pub body_timeout: Duration,
    /// Longest a response write may make no progress.
    pub write_timeout: Duration,
}

impl ApiLimits {
    /// Default connection cap.
    pub const DEFAULT_MAX_CONNECTIONS: usize = crate::options::DEFAULT_API_MAX_CONNECTIONS;
}

impl Default for ApiLimits {
    fn default() -> Self {
        Self {
            max_connections: Self::DEFAULT_MAX_CONNECTIONS,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(10),
        }
    }
}

/// One open connection.
#[derive(Debug)]
struct Conn {
    /// Its requests in a handler now.
    busy: AtomicUsize,
    /// When it last became idle (accept, or the end of a handler), ns since the table's epoch.
    idle_since_ns: AtomicU64,
    /// Told to close (evicted to make room).
    evict: Notify,
}

/// The open connections.
#[derive(Debug)]
struct Table {
    epoch: Instant,
    conns: Mutex<HashMap<u64, Arc<Conn>>>,
    /// Signalled when a connection ends.
    ended: Notify,
}

impl Table {
    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Arc<Conn>>> {
        // A poisoned table still holds valid entries (no invariant spans two of them).
        self.conns
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn now_ns(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Registers a new connection, making room at the cap; `None` when every connection has a
    /// request in a handler.
    fn admit(&self, id: u64, cap: usize) -> Option<Arc<Conn>> {
        let mut conns = self.lock();
        if conns.len() >= cap {
            let victim = conns
                .iter()
                .filter(|(_, c)| c.busy.load(Ordering::Acquire) == 0)
                .min_by_key(|(_, c)| c.idle_since_ns.load(Ordering::Acquire))
                .map(|(id, _)| *id)?;
            if let Some(conn) = conns.remove(&victim) {
                // Stored as a permit if its task is not waiting yet.
                conn.evict.notify_one();
            }
        }
        let conn = Arc::new(Conn {
            busy: AtomicUsize::new(0),
            idle_since_ns: AtomicU64::new(self.now_ns()),
            evict: Notify::new(),
        });
        conns.insert(id, conn.clone());
        Some(conn)
    }

    fn remove(&self, id: u64) {
        self.lock().remove(&id);
        self.ended.notify_waiters();
    }
}

/// Marks a connection busy while a request is in a handler.
struct BusyGuard {
    conn: Arc<Conn>,
    table: Arc<Table>,
}

impl BusyGuard {
    fn new(conn: Arc<Conn>, table: Arc<Table>) -> Self {
        conn.busy.fetch_add(1, Ordering::AcqRel);
        Self { conn, table }
    }
}

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.conn
            .idle_since_ns
            .store(self.table.now_ns(), Ordering::Release);
        self.conn.busy.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The router as a hyper service that keeps its connection's busy count.
#[derive(Clone)]
struct Tracked {
    inner: TowerToHyperService<Router>,
    conn: Arc<Conn>,
    table: Arc<Table>,
}

impl hyper::service::Service<hyper::Request<Incoming>> for Tracked {
    type Response = axum::response::Response;
    type Error = std::convert::Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn call(&self, request: hyper::Request<Incoming>) -> Self::Future {
        let guard = BusyGuard::new(self.conn.clone(), self.table.clone());
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await;
            drop(guard);
            response
        })
    }
}

/// A TCP stream whose writes fail with `TimedOut` after making no progress for a while.
struct WriteDeadline {
    stream: TcpStream,
    limit: Duration,
    timer: Pin<Box<tokio::time::Sleep>>,
    armed: bool,
}

impl WriteDeadline {
    fn new(stream: TcpStream, limit: Duration) -> Self {
        Self {
            stream,
            limit,
            timer: Box::pin(tokio::time::sleep(limit)),
            armed: false,
        }
    }

    /// The write is pending: arms the timer (once per stall) and fails when it fired.
    fn stalled<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        if !self.armed {
            self.armed = true;
            self.timer
                .as_mut()
                .reset(tokio::time::Instant::now() + self.limit);
        }
        match self.timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "the client read nothing of the response for {:?}",
                    self.limit
                ),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn progressed<T>(
        &mut self,
        result: Poll<io::Result<T>>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<T>> {
        match result {
            Poll::Ready(result) => {
                self.armed = false;
                Poll::Ready(result)
            }
            Poll::Pending => self.stalled(cx),
        }
    }
}

impl AsyncRead for WriteDeadline {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for WriteDeadline {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let result = Pin::new(&mut this.stream).poll_write(cx, buf);
        this.progressed(result, cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let result = Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        this.progressed(result, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let result = Pin::new(&mut this.stream).poll_flush(cx);
        this.progressed(result, cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let result = Pin::new(&mut this.stream).poll_shutdown(cx);
        this.progressed(result, cx)
    }
}

/// The answer to a connection over the cap when none can be closed to make room.
const TOO_MANY: &str = "{\"error\":{\"code\":\"too_many_connections\",\"message\":\"every \
    connection of the control API has a request in progress; retry shortly\"}}";

/// Accepts and serves connections until `stopped`; then lets the open ones finish their
/// requests (at most `grace`).
pub(super) async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    limits: ApiLimits,
    mut stopped: watch::Receiver<bool>,
    grace: Duration,
) -> io::Result<()> {
    let table = Arc::new(Table {
        epoch: Instant::now(),
        conns: Mutex::new(HashMap::new()),
        ended: Notify::new(),
    });
    let service = TowerToHyperService::new(app);
    let mut next_id = 0u64;
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    accept_failed(&error).await;
                    continue;
                }
            },
            // An error means the sender is gone: stop too.
            _ = stopped.wait_for(|stop| *stop) => break,
        };
        next_id += 1;
        let id = next_id;
        let Some(conn) = table.admit(id, limits.max_connections) else {
            tracing::warn!(%peer, cap = limits.max_connections,
                "control API: every connection is busy; refused one");
            refuse(&stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let io = TokioIo::new(WriteDeadline::new(stream, limits.write_timeout));
        let tracked = Tracked {
            inner: service.clone(),
            conn: conn.clone(),
            table: table.clone(),
        };
        let (table, mut stop) = (table.clone(), stopped.clone());
        tokio::spawn(async move {
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .serve_connection(io, tracked);
            tokio::pin!(connection);
            tokio::select! {
                result = connection.as_mut() => {
                    if let Err(error) = result {
                        tracing::debug!(%peer, %error, "control API connection ended");
                    }
                }
                // Dropping the connection closes the socket.
                () = conn.evict.notified() => {
                    tracing::debug!(%peer, "control API connection closed to make room");
                }
                () = async { drop(stop.wait_for(|stop| *stop).await) } => {
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
            }
            table.remove(id);
        });
    }
    // Stopped: no new connections; the open ones finish their requests.
    let deadline = tokio::time::Instant::now() + grace;
    loop {
        let ended = table.ended.notified();
        if table.lock().is_empty() {
            return Ok(());
        }
        if tokio::time::timeout_at(deadline, ended).await.is_err() {
            tracing::warn!("control API: requests still running after {grace:?}; dropped");
            return Ok(());
        }
    }
}

/// Best effort: one 503 into the socket buffer, then the socket closes (dropped).
fn refuse(stream: &TcpStream) {
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: \
         close\r\nContent-Length: {}\r\n\r\n{TOO_MANY}",
        TOO_MANY.len()
    );
    let _ = stream.try_write(response.as_bytes());
}

/// An accept error: a connection reset before the accept is nothing; anything else (EMFILE:
/// out of file descriptors) is logged and the loop waits a little so it does not spin.
async fn accept_failed(error: &io::Error) {
    if matches!(
        error.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    ) {
        return;
    }
    tracing::error!(%error, "control API: accept failed");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> Table {
        Table {
            epoch: Instant::now(),
            conns: Mutex::new(HashMap::new()),
            ended: Notify::new(),
        }
    }

    #[test]
    fn at_the_cap_the_longest_idle_connection_makes_room() {
        let table = table();
        let first = table.admit(1, 3).expect("room");
        let second = table.admit(2, 3).expect("room");
        let third = table.admit(3, 3).expect("room");
        // 1 is busy, 2 idle since before 3: 2 goes.
        first.busy.store(1, Ordering::Release);
        second.idle_since_ns.store(5, Ordering::Release);
        third.idle_since_ns.store(9, Ordering::Release);
        table.admit(4, 3).expect("2 made room");
        let open: Vec<u64> = {
            let mut ids: Vec<u64> = table.lock().keys().copied().collect();
            ids.sort_unstable();
            ids
        };
        assert_eq!(open, vec![1, 3, 4]);
        // The evicted connection's task sees the notification even though it was not waiting.
        let mut notified = Box::pin(second.evict.notified());
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(notified.as_mut().poll(&mut cx).is_ready());
    }

    #[test]
    fn when_every_connection_is_busy_the_new_one_is_refused() {
        let table = table();
        for id in 1..=2 {
            table
                .admit(id, 2)
                .expect("room")
                .busy
                .store(1, Ordering::Release);
        }
        assert!(table.admit(3, 2).is_none());
        assert_eq!(table.lock().len(), 2);
    }
}
