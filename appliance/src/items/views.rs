//! What the API shows: item, slot and job views, points, metrics.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::Ordering;

use engine::delta::Consistency;
use engine::error::report;
use engine::meta::item_key;

use crate::dataport::PortHandle;
use crate::jobs::JobView;
use crate::runtime::WorkerStatus;
use crate::slots::{ItemId, SlotState};
use engine::clock::now_unix_ns;

use super::error::OpError;
use super::item::{Item, lock};
use super::manager::Manager;
use super::model::{DiskView, ItemView, SlotUse, SlotView, SlotsView};
use super::record::ItemRecord;
use super::state::{allowed, replicating, sync_job_kind};

impl Manager {
    /// Share of the initial copy or resync done (100 outside those states).
    pub(super) fn sync_percent(&self, item: &Item, record: &ItemRecord) -> u8 {
        if sync_job_kind(record.state).is_none() {
            return 100;
        }
        let total: u64 = record
            .disks
            .iter()
            .map(|d| d.size_bytes)
            .sum::<u64>()
            .max(1);
        let applied = item
            .status()
            .map_or(0, |s| s.counters().applied_bytes.load(Ordering::Relaxed));
        (applied.saturating_mul(100) / total).min(99) as u8
    }

    /// The API's view of an item.
    pub(super) fn view(&self, item: &Item) -> ItemView {
        let record = item.record().clone();
        let key = item_key(&item.id);
        let points = self.meta.points(key).unwrap_or_default();
        let (staged_seq, cache_used_bytes) = item
            .repl()
            .as_ref()
            .map_or((0, 0), |r| (r.reader.durable_seq(), r.reader.used_bytes()));
        let status = item.status();
        let applied_seq = self.meta.state(key).map_or(0, |(applied, _)| applied);
        // Only while the worker waits before the frame (a replicating item); once drained by
        // a failover or disable the failure is history.
        let apply_failure = status
            .as_ref()
            .and_then(WorkerStatus::apply_failure)
            .filter(|_| replicating(record.state) && item.repl().is_some());
        let quarantine = item.quarantine();
        let health = if let Some(quarantine) = &quarantine {
            format!("quarantined: {}", quarantine.reason)
        } else if let Some((failure, frame)) = &apply_failure {
            crate::runtime::apply_failed_health(failure, frame)
        } else if let Some(error) = &record.last_error {
            format!("error: {error}")
        } else if let Some(error) = status.as_ref().and_then(WorkerStatus::error) {
            format!("apply stopped: {error}")
        } else if status.as_ref().is_some_and(WorkerStatus::failed) {
            "apply stopped on an error (see the appliance log)".into()
        } else if replicating(record.state) && item.repl().is_none() {
            "not replicating (see last_error and the appliance log)".into()
        } else {
            "healthy".into()
        };
        let slots = lock(&self.slots);
        let now = now_unix_ns();
        ItemView {
            id: item.hex.clone(),
            name: record.name.clone(),
            state: record.state,
            allowed_operations: allowed(&record),
            role: record.role,
            reverse_of: record.reverse_of.clone(),
            reversed_by: record.reversed_by.clone(),
            disks: record
                .disks
                .iter()
                .map(|d| DiskView {
                    index: d.index,
                    size_bytes: d.size_bytes,
                    block_size_bytes: d.block_size_bytes,
                    path: d.path.clone(),
                    lun: slots.lun_of(ItemId(item.id), d.index).map(|l| l.0),
                    origin: d.origin,
                })
                .collect(),
            policy: record.policy,
            health,
            apply_failure: apply_failure.map(|(failure, _)| failure),
            synchronized_percent: self.sync_percent(item, &record),
            rpo_lag_ms: points
                .last()
                .filter(|_| replicating(record.state))
                .map(|p| now.saturating_sub(p.source_timestamp_ns) / 1_000_000),
            cache_used_bytes,
            cache_capacity_bytes: self.options.cache_bytes,
            applied_seq,
            staged_seq: staged_seq.max(applied_seq),
            points: points.len() as u64,
            latest_point_id: points.last().map(|p| p.point_id),
            latest_app_point_id: points
                .iter()
                .rev()
                .find(|p| p.consistency == Consistency::App)
                .map(|p| p.point_id),
            temporary_os_disk: record.temporary_os_disk.clone(),
            test_failover: record.test_failover.clone(),
            failover: record.failover.clone(),
            last_job: record.last_job,
            last_error: record.last_error,
            quarantine,
        }
    }

    /// Every item.
    pub fn items(&self) -> Vec<ItemView> {
        self.all_items().iter().map(|i| self.view(i)).collect()
    }

    /// One item.
    pub fn item_view(&self, hex: &str) -> Result<ItemView, OpError> {
        let item = self.find(hex)?;
        Ok(self.view(&item))
    }

    /// The recovery points of an item, oldest first.
    pub fn points(&self, hex: &str) -> Result<Vec<engine::meta::PointRecord>, OpError> {
        let item = self.find(hex)?;
        self.meta
            .points(item_key(&item.id))
            .map_err(|e| OpError::Io(format!("item {hex}: {}", report(&e))))
    }

    /// The slot table.
    pub fn slots(&self) -> SlotsView {
        let slots = lock(&self.slots);
        let counts = slots.counts();
        let slot_count = slots.slot_count();
        SlotsView {
            slot_count,
            usable: slot_count.saturating_sub(1),
            free: counts.free as u32,
            reserved: counts.reserved as u32,
            attached: counts.attached as u32,
            slots: slots
                .table()
                .into_iter()
                .map(|row| {
                    let (state, item, disk_index, path) = match row.state {
                        SlotState::Free => (SlotUse::Free, None, None, None),
                        SlotState::Appliance => (SlotUse::Appliance, None, None, None),
                        SlotState::Reserved {
                            item, disk_index, ..
                        } => (
                            SlotUse::Reserved,
                            Some(item.to_string()),
                            Some(disk_index),
                            None,
                        ),
                        SlotState::Attached {
                            item,
                            disk_index,
                            path,
                        } => (
                            SlotUse::Attached,
                            Some(item.to_string()),
                            Some(disk_index),
                            Some(path.display().to_string()),
                        ),
                    };
                    SlotView {
                        lun: row.lun.0,
                        state,
                        item,
                        disk_index,
                        path,
                    }
                })
                .collect(),
        }
    }

    /// Jobs, newest first.
    pub fn jobs(&self) -> Vec<JobView> {
        self.jobs.list()
    }

    /// One job.
    pub fn job(&self, id: u64) -> Result<JobView, OpError> {
        self.jobs
            .get(id)
            .map(|j| j.view())
            .ok_or_else(|| OpError::NotFound {
                code: "job_not_found",
                message: format!("no job {id}"),
            })
    }

    /// The data directory (canonical).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Metrics of every item, the slots and the jobs.
    pub fn metrics(&self) -> crate::metrics::MetricsSnapshot {
        let mut items = Vec::new();
        for item in self.all_items() {
            let view = self.view(&item);
            let counters = item.status();
            items.push(crate::metrics::ItemMetrics {
                id: view.id.clone(),
                name: view.name.clone(),
                state: view.state.name().to_owned(),
                rpo_lag_seconds: view.rpo_lag_ms.map(|ms| ms as f64 / 1000.0),
                cache_used_bytes: view.cache_used_bytes,
                cache_capacity_bytes: view.cache_capacity_bytes,
                applied_bytes_total: counters
                    .as_ref()
                    .map_or(0, |s| s.counters().applied_bytes.load(Ordering::Relaxed)),
                applied_frames_total: counters
                    .as_ref()
                    .map_or(0, |s| s.counters().applied_frames.load(Ordering::Relaxed)),
                applied_seq: view.applied_seq,
                staged_seq: view.staged_seq,
                synchronized_percent: view.synchronized_percent,
                points: view.points,
                apply_failed_seq: view.apply_failure.as_ref().map(|f| f.seq),
                apply_latency: counters
                    .as_ref()
                    .map(|s| s.counters().batch_latency.snapshot())
                    .unwrap_or_default(),
            });
        }
        let slots = self.slots();
        let port = self.port.get().map(PortHandle::stats).unwrap_or_default();
        let mut jobs_by_state: BTreeMap<(String, String), u64> = BTreeMap::new();
        for job in self.jobs.list() {
            *jobs_by_state
                .entry((job.kind.name().to_owned(), job.state.name().to_owned()))
                .or_default() += 1;
        }
        let exports = self.exports_view();
        crate::metrics::MetricsSnapshot {
            items,
            slots_total: slots.slot_count,
            slots_free: slots.free,
            slots_attached: slots.attached,
            slots_reserved: slots.reserved,
            jobs_by_state: jobs_by_state
                .into_iter()
                .map(|((kind, state), n)| (kind, state, n))
                .collect(),
            data_port_sessions_total: port.sessions,
            data_port_connections: port.active as u64,
            exports_by_purpose: exports
                .iter()
                .fold(BTreeMap::new(), |mut by, e| {
                    *by.entry(e.purpose.name().to_owned()).or_insert(0u64) += 1;
                    by
                })
                .into_iter()
                .collect(),
            nbd_connections: exports.iter().map(|e| u64::from(e.connections)).sum(),
        }
    }
}
