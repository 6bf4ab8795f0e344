//! The proxy itself: listen, accept, connect upstream, run both directions of each
//! connection (appliance -> agent here: forwarded as it comes, delayed or dropped).

use super::up::{Phase, Up};
use super::*;

/// A running fault-injecting proxy. Dropping it stops accepting and drops every connection.
#[derive(Debug)]
pub struct Proxy {
    shared: Arc<Shared>,
    local_addr: SocketAddr,
    accept: Option<JoinHandle<()>>,
}

impl Proxy {
    /// Listens on a loopback port of its own and forwards each connection to `upstream`,
    /// with the standing faults of `plan`.
    pub fn start(upstream: SocketAddr, plan: FaultPlan) -> io::Result<Self> {
        let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))?;
        let local_addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            upstream: Mutex::new(upstream),
            plan: Mutex::new(plan),
            armed: Mutex::new(Armed::default()),
            live: Mutex::new(Vec::new()),
            counters: Counters::default(),
            stopping: AtomicBool::new(false),
        });
        let accept = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("netfault-accept".into())
                .spawn(move || accept_loop(&shared, &listener))?
        };
        Ok(Self {
            shared,
            local_addr,
            accept: Some(accept),
        })
    }

    /// The address agents connect to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Where new connections are forwarded to.
    pub fn upstream(&self) -> SocketAddr {
        *lock(&self.shared.upstream)
    }

    /// Forwards new connections to `upstream` from now on (live ones keep theirs).
    pub fn set_upstream(&self, upstream: SocketAddr) {
        *lock(&self.shared.upstream) = upstream;
    }

    /// Replaces the standing faults (live connections see the new chances and delays at
    /// their next frame or chunk; `drop_after_bytes` and the seed apply to new connections).
    pub fn set(&self, plan: FaultPlan) {
        *lock(&self.shared.plan) = plan;
    }

    /// The standing faults.
    pub fn plan(&self) -> FaultPlan {
        self.shared.plan()
    }

    /// Arms a one-shot fault. Several of a kind add up (two `Flip`s flip two frames); a new
    /// `DropAfterBytes` or delay replaces an armed one of the same kind.
    pub fn arm(&self, fault: NetFault) {
        let mut armed = lock(&self.shared.armed);
        match fault {
            NetFault::DropAfterBytes(bytes) => armed.drop_after = Some(bytes),
            NetFault::Flip => armed.flips += 1,
            NetFault::Duplicate => armed.duplicates += 1,
            NetFault::Reorder => armed.reorders += 1,
            NetFault::DelayUp { delay, chunks } => armed.delay_up = Some((delay, chunks)),
            NetFault::DelayDown { delay, chunks } => armed.delay_down = Some((delay, chunks)),
        }
    }

    /// Forgets every armed one-shot fault that has not fired yet.
    pub fn disarm(&self) {
        *lock(&self.shared.armed) = Armed::default();
    }

    /// How many one-shot faults are armed and have not fired yet.
    pub fn armed(&self) -> u32 {
        let armed = *lock(&self.shared.armed);
        u32::from(armed.drop_after.is_some())
            + armed.flips
            + armed.duplicates
            + armed.reorders
            + u32::from(armed.delay_up.is_some())
            + u32::from(armed.delay_down.is_some())
    }

    /// Drops every live connection now (both sides see the connection end). Returns how many.
    pub fn drop_connections(&self) -> usize {
        let live = lock(&self.shared.live);
        let mut dropped = 0;
        for connection in live.iter() {
            if !connection.dead.swap(true, Ordering::AcqRel) {
                dropped += 1;
                bump(&self.shared.counters.drops, 1);
            }
            let _ = connection.agent.shutdown(Shutdown::Both);
            if let Some(upstream) = &connection.upstream {
                let _ = upstream.shutdown(Shutdown::Both);
            }
        }
        dropped
    }

    /// Connections open now.
    pub fn live_connections(&self) -> usize {
        lock(&self.shared.live).len()
    }

    /// What it did so far.
    pub fn stats(&self) -> ProxyStats {
        let c = &self.shared.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ProxyStats {
            connections: get(&c.connections),
            upstream_failures: get(&c.upstream_failures),
            unframed: get(&c.unframed),
            bytes_up: get(&c.bytes_up),
            bytes_down: get(&c.bytes_down),
            frames: get(&c.frames),
            drops: get(&c.drops),
            delays: get(&c.delays),
            delay_ms: get(&c.delay_ms),
            flips: get(&c.flips),
            duplicates: get(&c.duplicates),
            reorders: get(&c.reorders),
            reorders_released: get(&c.reorders_released),
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::Release);
        // Wake the blocking accept.
        let _ = TcpStream::connect_timeout(&self.local_addr, Duration::from_secs(1));
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
        for connection in lock(&self.shared.live).iter() {
            connection.dead.store(true, Ordering::Release);
            let _ = connection.agent.shutdown(Shutdown::Both);
            if let Some(upstream) = &connection.upstream {
                let _ = upstream.shutdown(Shutdown::Both);
            }
        }
    }
}

pub(super) fn accept_loop(shared: &Arc<Shared>, listener: &TcpListener) {
    let mut next_id = 0u64;
    loop {
        let accepted = listener.accept();
        if shared.stopping.load(Ordering::Acquire) {
            return;
        }
        let Ok((agent, _)) = accepted else {
            std::thread::sleep(POLL);
            continue;
        };
        next_id += 1;
        let id = next_id;
        bump(&shared.counters.connections, 1);
        let dead = Arc::new(AtomicBool::new(false));
        let Ok(agent_clone) = agent.try_clone() else {
            continue;
        };
        shared.register(Live {
            id,
            agent: agent_clone,
            upstream: None,
            dead: dead.clone(),
        });
        let thread_shared = shared.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("netfault-{id}"))
            .spawn(move || {
                serve(&thread_shared, id, agent, &dead);
                thread_shared.unregister(id);
            });
        if spawned.is_err() {
            shared.unregister(id);
        }
    }
}

/// One connection: connect upstream, run both directions, tear down.
pub(super) fn serve(shared: &Arc<Shared>, id: u64, agent: TcpStream, dead: &Arc<AtomicBool>) {
    let upstream_addr = *lock(&shared.upstream);
    let upstream = match TcpStream::connect_timeout(&upstream_addr, CONNECT_TIMEOUT) {
        Ok(upstream) => upstream,
        Err(_) => {
            bump(&shared.counters.upstream_failures, 1);
            let _ = agent.shutdown(Shutdown::Both);
            return;
        }
    };
    shared.set_upstream_socket(id, &upstream);
    if dead.load(Ordering::Acquire) || shared.stopping.load(Ordering::Acquire) {
        let _ = agent.shutdown(Shutdown::Both);
        let _ = upstream.shutdown(Shutdown::Both);
        return;
    }
    let setup = (|| -> io::Result<(TcpStream, TcpStream)> {
        for socket in [&agent, &upstream] {
            socket.set_nodelay(true)?;
            socket.set_read_timeout(Some(POLL))?;
            socket.set_write_timeout(Some(WRITE_TIMEOUT))?;
        }
        Ok((agent.try_clone()?, upstream.try_clone()?))
    })();
    let Ok((agent_down, upstream_down)) = setup else {
        let _ = agent.shutdown(Shutdown::Both);
        let _ = upstream.shutdown(Shutdown::Both);
        return;
    };
    let plan = shared.plan();
    let conn = Arc::new(Conn {
        agent,
        upstream,
        dead: dead.clone(),
    });
    let down = {
        let shared = shared.clone();
        let conn = conn.clone();
        let seed = plan.seed ^ id.wrapping_mul(0xd1b5_4a32_d192_ed03) ^ 0x646f_776e;
        std::thread::Builder::new()
            .name(format!("netfault-{id}-down"))
            .spawn(move || down_loop(&shared, &conn, &agent_down, &upstream_down, seed))
    };
    if down.is_err() {
        conn.abort();
        return;
    }
    let mut up = Up {
        shared,
        conn: &conn,
        rng: Rng::new(plan.seed ^ id.wrapping_mul(0x9e37_79b9_7f4a_7c15)),
        pending: Vec::new(),
        phase: Phase::Hello,
        held: None,
        standing_drop: plan.drop_after_bytes,
    };
    up.run();
    if let Ok(down) = down {
        let _ = down.join();
    }
    conn.abort();
}

/// The appliance → agent direction: forwarded as it comes, delayed if asked.
pub(super) fn down_loop(
    shared: &Shared,
    conn: &Conn,
    agent: &TcpStream,
    upstream: &TcpStream,
    seed: u64,
) {
    let mut rng = Rng::new(seed);
    let mut buf = vec![0u8; READ_BUFFER_BYTES];
    loop {
        if conn.is_dead() || shared.stopping.load(Ordering::Acquire) {
            return;
        }
        let n = match (&*upstream).read(&mut buf) {
            Ok(0) => {
                // The appliance closed its sending half: pass that on.
                let _ = agent.shutdown(Shutdown::Write);
                return;
            }
            Ok(n) => n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                continue;
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => return conn.abort(),
        };
        let delay = {
            let mut armed = lock(&shared.armed);
            match armed.delay_down.as_mut() {
                Some((delay, chunks)) if *chunks > 0 => {
                    let delay = *delay;
                    *chunks -= 1;
                    if *chunks == 0 {
                        armed.delay_down = None;
                    }
                    Some(delay)
                }
                _ => shared.plan().delay_down,
            }
        };
        if let Some(delay) = delay {
            sleep_counted(shared, delay.pick(&mut rng));
        }
        if conn.is_dead() {
            return;
        }
        if (&*agent).write_all(&buf[..n]).is_err() {
            return conn.abort();
        }
        bump(&shared.counters.bytes_down, n as u64);
    }
}
