//! Network faults between the source agent and a real `appliance serve`, one test per kind,
//! injected by `disk_sim::netfault::Proxy` on the data-port connection. Each shows what the
//! protocol (docs/design/data-port.md) does with the fault, and that nothing is lost: at the
//! end every recovery point (through test failover) and the final state (failover to
//! "latest") equal the source model, and the appliance staged and applied every frame the
//! agent made.
//!
//! | fault | what happens |
//! |---|---|
//! | drop (inside a frame, or an idle connection) | the session ends; the valid prefix is kept; the agent reconnects and resends from `next_seq` |
//! | delay (per chunk, both directions) | everything slows down; no reconnect |
//! | flip | `corrupt-frame` close naming the frame's seq and "checksum mismatch"; resent |
//! | duplicate | `corrupt-frame` close: "sequence reorder or duplicate"; resent |
//! | reorder (two frames swapped) | `corrupt-frame` close: "sequence gap"; resent |

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use disk_sim::chaos::{
    SourceModel, chaos_agent_config, enable_item, geometry, verify_failover_latest, verify_points,
    wait_applied,
};
use disk_sim::netfault::{Delay, FaultPlan, NetFault, Proxy, ProxyStats};
use disk_sim::site::{Appliance, parse_item_id};
use source_agent::sender::{Agent, AgentStats, CloseInfo, CloseReason};

/// A real appliance, one item, an agent connected through a proxy, and the source model.
struct Rig {
    appliance: Appliance,
    item: String,
    proxy: Proxy,
    agent: Option<Agent>,
    model: SourceModel,
    restore: PathBuf,
    last_seq: u64,
    _tmp: tempfile::TempDir,
}

impl Rig {
    fn start(plan: FaultPlan) -> Self {
        let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        let restore = tmp.path().join("restore");
        std::fs::create_dir_all(&restore).unwrap();
        let appliance = Appliance::start_with_bin(
            Path::new(env!("CARGO_BIN_EXE_appliance")),
            &tmp.path().join("data"),
            &["--disk-store", restore.to_str().unwrap()],
        )
        .unwrap();
        let disks = geometry(2, 4);
        let (item, token) = enable_item(&appliance, "netfault-vm", &disks, 1000).unwrap();
        let proxy = Proxy::start(appliance.data_addr, plan).unwrap();
        let config = chaos_agent_config(
            proxy.local_addr(),
            parse_item_id(&item).unwrap(),
            &token,
            "netfault-vm",
            &disks,
        );
        let agent = Agent::connect(config).unwrap();
        Self {
            appliance,
            item,
            proxy,
            agent: Some(agent),
            model: SourceModel::new(&disks, 42, 10).unwrap(),
            restore,
            last_seq: 0,
            _tmp: tmp,
        }
    }

    fn agent(&self) -> &Agent {
        self.agent.as_ref().unwrap()
    }

    /// `n` ops of the seeded workload (writes, trims, a bookmark every 10 writes).
    fn ops(&mut self, n: usize) {
        let agent = self.agent.as_ref().unwrap();
        for _ in 0..n {
            let (_, seq) = self.model.step(agent).unwrap();
            self.last_seq = seq;
        }
    }

    /// Waits until every frame made so far is acknowledged.
    fn flush(&self) -> u64 {
        let acked = self.agent().flush(Duration::from_secs(60)).unwrap();
        assert_eq!(acked, self.last_seq, "every frame acknowledged");
        acked
    }

    /// Flush, close, and check that nothing is lost: staged and applied cover every frame,
    /// every bookmark is a point equal to the model, the final state equals the model.
    fn finish(mut self) -> (AgentStats, ProxyStats) {
        // Every frame made so far through the proxy first: a one-shot fault armed before the
        // last ops meets its frame before the proxy is disarmed (the agent sends on its own
        // thread, so the ops returning does not mean their frames have passed).
        self.flush();
        let seq = self
            .model
            .bookmark(
                self.agent.as_ref().unwrap(),
                engine::delta::Consistency::App,
            )
            .unwrap();
        self.last_seq = seq;
        self.proxy.disarm();
        self.proxy.set(FaultPlan::default());
        let acked = self.flush();
        let agent = self.agent.take().unwrap();
        let stats = agent.stats();
        agent.close(Duration::from_secs(30)).unwrap();
        let view =
            wait_applied(&self.appliance, &self.item, acked, Duration::from_secs(60)).unwrap();
        assert!(view.staged_seq >= acked, "{view:?}");
        let mut out = Vec::new();
        let check = verify_points(
            &self.appliance,
            &self.item,
            &self.model.points,
            None,
            1000,
            &self.restore,
            &mut out,
        )
        .unwrap();
        assert!(
            check.missing.is_empty(),
            "bookmarks without a point: {check:?}"
        );
        assert!(check.mismatches.is_empty(), "{check:?}");
        assert_eq!(check.verified, self.model.points.len(), "{check:?}");
        let (point, mismatches) = verify_failover_latest(
            &self.appliance,
            &self.item,
            &self.model.digests().unwrap(),
            &self.restore.join("latest"),
        )
        .unwrap();
        assert!(mismatches.is_empty(), "final state: {mismatches:?}");
        assert!(point >= acked);
        let proxy = self.proxy.stats();
        eprintln!(
            "{acked} frames acknowledged, {} points verified; agent: {} sessions, {} frames \
             resent, closes {:?}; proxy: {proxy:?}",
            check.verified,
            stats.sessions,
            stats.frames_retransmitted,
            stats
                .closes
                .iter()
                .map(|c| format!("{} at {}: {}", c.reason, c.durable_seq, c.message))
                .collect::<Vec<_>>()
        );
        self.appliance.stop().unwrap();
        (stats, proxy)
    }
}

/// The corrupt-frame closes received; each names the frame after the durable seq (the
/// valid frames before the bad one were kept).
fn corrupt_closes(stats: &AgentStats) -> Vec<&CloseInfo> {
    let closes: Vec<&CloseInfo> = stats
        .closes
        .iter()
        .filter(|c| c.reason == CloseReason::CorruptFrame)
        .collect();
    for close in &closes {
        assert!(
            close
                .message
                .starts_with(&format!("frame seq {} ", close.durable_seq + 1)),
            "{close:?}"
        );
    }
    closes
}

#[test]
fn drop_inside_a_frame_and_of_an_idle_connection_loses_nothing() {
    let mut rig = Rig::start(FaultPlan::default());
    rig.ops(15);
    // Cut the connection 150,000 bytes on: inside a frame, with more frames queued behind.
    rig.proxy.arm(NetFault::DropAfterBytes(150_000));
    rig.ops(40);
    rig.flush();
    // The idle connection after the flush: dropped; the agent reconnects when it has more.
    assert_eq!(rig.proxy.drop_connections(), 1);
    rig.ops(20);
    let (agent, proxy) = rig.finish();
    assert_eq!(proxy.drops, 2, "{proxy:?}");
    assert!(agent.sessions >= 3, "{agent:?}");
    assert!(
        agent.frames_retransmitted >= 1,
        "the cut frame was resent: {agent:?}"
    );
    assert!(corrupt_closes(&agent).is_empty(), "{agent:?}");
}

#[test]
fn delays_slow_the_stream_but_break_nothing() {
    let plan = FaultPlan {
        seed: 7,
        delay_up: Some(Delay::jittered(
            Duration::from_millis(3),
            Duration::from_millis(4),
        )),
        delay_down: Some(Delay::fixed(Duration::from_millis(2))),
        ..FaultPlan::default()
    };
    let started = Instant::now();
    let mut rig = Rig::start(plan);
    rig.ops(60);
    rig.flush();
    // One-shot: a burst of longer delays on the acks.
    rig.proxy.arm(NetFault::DelayDown {
        delay: Delay::fixed(Duration::from_millis(50)),
        chunks: 5,
    });
    rig.ops(20);
    let frames = rig.last_seq;
    let (agent, proxy) = rig.finish();
    assert!(proxy.delays > frames, "{proxy:?}");
    assert!(
        started.elapsed() >= Duration::from_millis(3 * frames),
        "{proxy:?}"
    );
    assert_eq!(agent.sessions, 1, "no reconnect: {agent:?}");
    assert_eq!(agent.frames_retransmitted, 0, "{agent:?}");
}

#[test]
fn flipped_byte_closes_with_corrupt_frame_and_the_agent_resends() {
    let mut rig = Rig::start(FaultPlan::default());
    rig.ops(10);
    rig.flush();
    rig.proxy.arm(NetFault::Flip);
    rig.ops(30);
    let (agent, proxy) = rig.finish();
    assert_eq!(proxy.flips, 1, "{proxy:?}");
    let closes = corrupt_closes(&agent);
    assert_eq!(closes.len(), 1, "{agent:?}");
    assert!(
        closes[0].message.contains("checksum mismatch"),
        "{closes:?}"
    );
    assert!(
        agent.sessions >= 2 && agent.frames_retransmitted >= 1,
        "{agent:?}"
    );
}

#[test]
fn duplicated_frame_is_refused_as_a_duplicate_and_nothing_is_staged_twice() {
    let mut rig = Rig::start(FaultPlan::default());
    rig.ops(10);
    rig.flush();
    rig.proxy.arm(NetFault::Duplicate);
    rig.ops(30);
    let (agent, proxy) = rig.finish();
    assert_eq!(proxy.duplicates, 1, "{proxy:?}");
    let closes = corrupt_closes(&agent);
    assert_eq!(closes.len(), 1, "{agent:?}");
    assert!(
        closes[0].message.contains("sequence reorder or duplicate"),
        "{closes:?}"
    );
    assert!(agent.sessions >= 2, "{agent:?}");
}

#[test]
fn swapped_frames_are_refused_as_a_sequence_gap_and_resent_in_order() {
    let mut rig = Rig::start(FaultPlan::default());
    rig.ops(10);
    rig.flush();
    rig.proxy.arm(NetFault::Reorder);
    rig.ops(30);
    let (agent, proxy) = rig.finish();
    assert_eq!(proxy.reorders, 1, "{proxy:?}");
    let closes = corrupt_closes(&agent);
    assert_eq!(closes.len(), 1, "{agent:?}");
    assert!(closes[0].message.contains("sequence gap"), "{closes:?}");
    assert!(
        agent.sessions >= 2 && agent.frames_retransmitted >= 1,
        "{agent:?}"
    );
}

#[test]
fn standing_random_faults_on_every_frame_lose_nothing() {
    // Per frame: 1 % drop, 1 % flip, 1 % duplicate, 1 % reorder, seeded.
    let plan = FaultPlan {
        seed: 3,
        drop_ppm: 10_000,
        flip_ppm: 10_000,
        duplicate_ppm: 10_000,
        reorder_ppm: 10_000,
        ..FaultPlan::default()
    };
    let mut rig = Rig::start(plan);
    rig.ops(300);
    let (agent, proxy) = rig.finish();
    let injected = proxy.drops + proxy.flips + proxy.duplicates + proxy.reorders;
    assert!(injected >= 3, "{proxy:?}");
    assert!(agent.sessions >= 2, "{agent:?}");
}
