//! What the disk-writing jobs share: the point choice, target dirs, writing disks, undoing them.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use engine::apply::ApplyConfig;
use engine::dirfd::Dir;
use engine::error::report;
use engine::materialize::{OutputFormat, PointChoice, Source, materialize_new_file, resolve_point};
use engine::meta::item_key;

use crate::jobs::{Job, JobKind};
use crate::target::{
    Target, Temp, check_absent, disk_names, file_identity, partial_name, written_id,
};

use super::error::{OpError, bad, dir_refusal};
use super::item::Item;
use super::manager::Manager;
use super::model::{DiskRecord, Format, Materialized, PointSpec};
use super::record::ItemRecord;
use super::state::{Event, Op};

impl Manager {
    /// Writes every disk of `item` at `point_id` into the job's temporary files (`temps`, in
    /// disk order, in `dir`), each whole and durable. Names nothing: the caller publishes.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn write_disks(
        &self,
        item: &Item,
        point_id: u64,
        dir: &Dir,
        temps: &[Temp],
        format: Format,
        job: &Job,
        percent: (u64, u64),
    ) -> anyhow::Result<()> {
        let record = item.record().clone();
        if temps.len() != record.disks.len() {
            anyhow::bail!(
                "{} temporary files for {} disks",
                temps.len(),
                record.disks.len()
            );
        }
        let key = item_key(&item.id);
        let pins = self.pins(item);
        let _pin = pins.pin(point_id);
        if self.meta.point(key, point_id)?.is_none() {
            anyhow::bail!("recovery point {point_id} was pruned before it could be pinned");
        }
        let geometries = record.geometries();
        let source = Source {
            meta: &self.meta,
            item: key,
            disks: &geometries,
            preserve_dir: Arc::new(item.dirs.preserve()?),
            grain_bytes: ApplyConfig::default().grain_bytes,
            pins: pins.clone(),
        };
        let total: u64 = record
            .disks
            .iter()
            .map(|d| d.size_bytes)
            .sum::<u64>()
            .max(1);
        let mut done_before = 0u64;
        for (disk, temp) in record.disks.iter().zip(temps) {
            let replica =
                File::open(&disk.path).with_context(|| format!("opening replica {}", disk.path))?;
            let out = dir.path().join(&temp.name);
            let (low, high) = percent;
            materialize_new_file(
                &source,
                point_id,
                disk.index as u16,
                &replica,
                &temp.file,
                &out,
                output_format(format),
                &mut |done| {
                    let share = (done_before + done) * (high - low) / total;
                    job.progress(
                        low + share,
                        format!("writing disk {} at point {point_id}", disk.index),
                    );
                },
            )
            .with_context(|| format!("materializing disk {} to {}", disk.index, out.display()))?;
            done_before += disk.size_bytes;
        }
        Ok(())
    }

    pub(super) fn resolve(&self, item: &Item, choice: PointChoice) -> Result<u64, OpError> {
        resolve_point(&self.meta, item_key(&item.id), choice)
            .map(|p| p.point_id)
            .map_err(|e| OpError::NotFound {
                code: "point_not_found",
                message: format!("item {}: {}", item.hex, report(&e)),
            })
    }

    /// Opens a job's target directory without following symbolic links (creating what is
    /// missing), refuses it if a running job owns it (`target_dir_busy`) or if any name the
    /// job uses exists (`path_in_use`), and creates the job's temporary files there (see
    /// `crate::target`). Nothing is created when refused.
    pub(super) fn target_dir(
        &self,
        raw: &str,
        disks: &[DiskRecord],
        format: Format,
    ) -> Result<Target, OpError> {
        let path = self.check_path(raw, "target_dir")?;
        let (dir, created) = match Dir::open_nofollow(&path, false) {
            Ok((dir, _)) => {
                self.check_target_free(&dir)?;
                (dir, false)
            }
            Err(error) if error.is_not_found() => {
                Dir::open_nofollow(&path, true).map_err(|e| dir_refusal("target_dir", e))?
            }
            Err(error) => return Err(dir_refusal("target_dir", error)),
        };
        let names = disk_names(
            disks.iter().map(|d| d.index),
            output_format(format).extension(),
        );
        check_absent(&dir, &names).map_err(|e| dir_refusal("target_dir", e))?;
        Target::create_temps(Arc::new(dir), created, &names)
            .map_err(|e| dir_refusal("target_dir", e))
    }

    /// Opens the failed-over disks' directory for a change point: it must still be the
    /// directory the failover wrote and hold the files it recorded (else `target_changed`), no
    /// running job may own it, and the temporary names must be free; creates the temporary
    /// files.
    pub(super) fn change_target(
        &self,
        current: &Materialized,
        disks: usize,
    ) -> Result<Target, OpError> {
        let changed = |why: String| OpError::Conflict {
            code: "target_changed",
            message: format!(
                "the failed-over disks in {}: {why}; change point replaces only the files the \
                 failover wrote",
                current.target_dir
            ),
        };
        let Some(dir_id) = current
            .target_dir_id
            .filter(|_| current.written.len() == disks)
        else {
            return Err(changed(
                "recorded without file identities (by an older version)".into(),
            ));
        };
        let (dir, _) = Dir::open_nofollow(Path::new(&current.target_dir), false)
            .map_err(|e| changed(report(&e)))?;
        if file_identity(dir.id()) != dir_id {
            return Err(changed("the directory was moved or replaced".into()));
        }
        self.check_target_free(&dir)?;
        for file in &current.written {
            dir.check_ours(std::ffi::OsStr::new(&file.name), written_id(file))
                .map_err(|e| changed(report(&e)))?;
        }
        let names: Vec<String> = current.written.iter().map(|w| w.name.clone()).collect();
        Target::create_temps(Arc::new(dir), false, &names).map_err(|e| dir_refusal("target_dir", e))
    }

    /// Creates the job of a request that made `target`, makes the job own the directory and
    /// applies `event` to the item's record, which then names the job and the files it will
    /// write (`pending`); on an error removes what the request made.
    pub(super) fn start_target_job(
        &self,
        item: &Item,
        target: &Target,
        kind: JobKind,
        message: String,
        event: Event,
        pending: Materialized,
    ) -> Result<Arc<Job>, OpError> {
        let job = self
            .jobs
            .create(kind, &item.hex, message)
            .inspect_err(|_| {
                target.abandon();
            })?;
        job.hold_target_dir(target.dir.id().dev, target.dir.id().ino);
        let id = job.id();
        let change = |r: &mut ItemRecord| {
            r.pending = Some(pending);
            r.last_job = Some(id);
            r.last_error = None;
        };
        if let Err(error) = item.transition(event, change) {
            target.abandon();
            let _ = job.fail(crate::store::describe(&error));
            return Err(error.into());
        }
        Ok(job)
    }

    /// Refuses a directory a running job owns (compared by device and inode).
    pub(super) fn check_target_free(&self, dir: &Dir) -> Result<(), OpError> {
        match self.jobs.target_dir_holder(dir.id().dev, dir.id().ino) {
            Some(holder) => Err(OpError::Conflict {
                code: "target_dir_busy",
                message: format!(
                    "target_dir {} is the target directory of job {} ({} of item {}), which \
                     is running; one job writes into a directory at a time",
                    dir.path().display(),
                    holder.id,
                    holder.kind.name(),
                    holder.item
                ),
            }),
            None => Ok(()),
        }
    }
}

/// Undoes a failed job that was writing disks: removes what it wrote, returns the item to the
/// state before the job (`Event::Failed(op)`) and records the error.
pub(super) fn undo_pending(item: &Item, op: Op, error: &str) {
    // Bound first: in `if let` the record's guard would live through the removals.
    let pending = item.record().pending.clone();
    if let Some(pending) = pending {
        remove_materialized(&pending);
    }
    if let Err(e) = item.transition(Event::Failed(op), |r| {
        r.pending = None;
        r.last_error = Some(error.to_owned());
    }) {
        tracing::error!(item = %item.hex, error = %crate::store::describe(&e), "recording a failed job");
    }
}

/// The record of a job that writes `names` into `target`: its temporary files are what it
/// wrote so far.
pub(super) fn planned(
    target: &Target,
    names: &[String],
    point_id: u64,
    format: Format,
) -> Materialized {
    let dir = target.dir.path();
    Materialized {
        point_id,
        target_dir: dir.display().to_string(),
        format,
        files: names
            .iter()
            .map(|name| dir.join(name).display().to_string())
            .collect(),
        created_dir: target.created_dir,
        target_dir_id: Some(file_identity(target.dir.id())),
        written: target.written(),
        export_id: None,
        copy: None,
    }
}

/// Removes what a job recorded it wrote (see `crate::target::remove_recorded`): files at the
/// recorded names, the listed names and their `.partial` names, only where the identity is a
/// recorded one; then the directory if the job created it and it is empty.
pub(super) fn remove_materialized(materialized: &Materialized) {
    let names: Vec<String> = materialized
        .files
        .iter()
        .filter_map(|file| Path::new(file).file_name()?.to_str())
        .flat_map(|name| [name.to_owned(), partial_name(name)])
        .collect();
    for left in crate::target::remove_recorded(
        &materialized.target_dir,
        materialized.target_dir_id,
        &materialized.written,
        &names,
        materialized.created_dir,
    ) {
        tracing::warn!(target_dir = %materialized.target_dir, %left, "clean-up left something");
    }
}

/// The engine's output format of a requested image format.
pub(super) fn output_format(format: Format) -> OutputFormat {
    match format {
        Format::Raw => OutputFormat::Raw,
        Format::Vhd => OutputFormat::FixedVhd,
    }
}

/// The engine's point choice of a request's `point` (`"latest"` only where `latest_allowed`).
pub(super) fn point_choice(spec: &PointSpec, latest_allowed: bool) -> Result<PointChoice, OpError> {
    match spec {
        PointSpec::Id(id) => Ok(PointChoice::Custom(*id)),
        PointSpec::Named(name) => match name.as_str() {
            "latest" if latest_allowed => Ok(PointChoice::Latest),
            "latest" => Err(bad(
                "point",
                "\"latest\" applies everything received and makes a point of it; it is \
                 for failover only (use \"latest-processed\")",
            )),
            "latest-processed" => Ok(PointChoice::LatestProcessed),
            "latest-app" | "latest-app-consistent" => Ok(PointChoice::LatestAppConsistent),
            other => other.parse().map(PointChoice::Custom).map_err(|_| {
                bad(
                    "point",
                    format!(
                        "{other:?} is not \"latest\", \"latest-processed\", \"latest-app\" \
                         or a point id"
                    ),
                )
            }),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn named(name: &str) -> PointSpec {
        PointSpec::Named(name.into())
    }

    fn refusal(result: Result<PointChoice, OpError>) -> String {
        match result {
            Err(OpError::BadRequest { field, message, .. }) => {
                assert_eq!(field.as_deref(), Some("point"));
                message
            }
            other => panic!("not refused: {other:?}"),
        }
    }

    #[test]
    fn point_choices_by_id_and_name() {
        assert_eq!(
            point_choice(&PointSpec::Id(7), false).ok(),
            Some(PointChoice::Custom(7))
        );
        assert_eq!(
            point_choice(&named("12"), false).ok(),
            Some(PointChoice::Custom(12))
        );
        assert_eq!(
            point_choice(&named("latest-processed"), false).ok(),
            Some(PointChoice::LatestProcessed)
        );
        for app in ["latest-app", "latest-app-consistent"] {
            assert_eq!(
                point_choice(&named(app), false).ok(),
                Some(PointChoice::LatestAppConsistent)
            );
        }
        assert_eq!(
            point_choice(&named("latest"), true).ok(),
            Some(PointChoice::Latest)
        );
    }

    #[test]
    fn latest_is_for_failover_only_and_other_names_are_refused() {
        let message = refusal(point_choice(&named("latest"), false));
        assert!(message.contains("for failover only"), "{message}");
        let message = refusal(point_choice(&named("newest"), true));
        assert!(message.contains("\"newest\" is not"), "{message}");
    }

    #[test]
    fn formats_map_to_the_engine_s() {
        assert_eq!(output_format(Format::Raw), OutputFormat::Raw);
        assert_eq!(output_format(Format::Vhd), OutputFormat::FixedVhd);
    }
}
