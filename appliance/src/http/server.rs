//! [`ApiServer`]: binds the control API, serves it on a thread of its own with a 2-worker tokio
//! runtime, and shuts it down gracefully (requests in flight finish, at most [`GRACE`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, bail};

use super::conn;
use super::routes;
use super::state::{ApiConfig, Shared};

/// How long a graceful shutdown waits for requests in flight.
pub const GRACE: Duration = Duration::from_secs(5);

/// The running API server.
#[derive(Debug)]
pub struct ApiServer {
    addr: SocketAddr,
    stop: tokio::sync::watch::Sender<bool>,
    thread: Option<JoinHandle<std::io::Result<()>>>,
}

impl ApiServer {
    /// Binds `addr` and serves the API on a thread of its own.
    pub fn start(addr: SocketAddr, config: ApiConfig) -> anyhow::Result<Self> {
        let listener = std::net::TcpListener::bind(addr)
            .with_context(|| format!("binding the control API to {addr}"))?;
        listener.set_nonblocking(true)?;
        let api_addr = listener.local_addr()?;
        let limits = config.limits;
        let app = routes::router(Arc::new(Shared { config, api_addr }))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("api")
            .enable_all()
            .build()
            .context("starting the control API runtime")?;
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let thread = std::thread::Builder::new()
            .name("api".into())
            .spawn(move || {
                let result = runtime.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(listener)?;
                    conn::serve(listener, app, limits, stopped, GRACE).await
                });
                runtime.shutdown_timeout(GRACE);
                result
            })
            .context("starting the control API thread")?;
        Ok(Self {
            addr: api_addr,
            stop,
            thread: Some(thread),
        })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting, finishes requests in flight (at most [`GRACE`]) and joins the thread.
    pub fn shutdown(mut self) -> anyhow::Result<()> {
        self.stop.send_replace(true);
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(result)) => result.context("control API"),
            Some(Err(_)) => bail!("control API thread panicked"),
            None => Ok(()),
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}
