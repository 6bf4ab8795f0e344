//! Re-protect: the original VM's disks become the replicas of a new reverse item.

use std::path::Path;

use super::error::OpError;
use super::item::lock;
use super::manager::Manager;
use super::model::{
    DiskSpec, EnableRequest, Enabled, MAX_NAME_CHARS, PolicyRequest, ReprotectRequest, Role,
};
use super::paths::disk_size;
use super::state::{Event, Op};

impl Manager {
    /// Re-protect: the original VM's disks become the replicas of a new reverse item, a
    /// temporary OS disk is made for the original VM, and the agent of the failed-over VM
    /// runs a delta resync into them.
    pub fn reprotect(&self, hex: &str, request: ReprotectRequest) -> Result<Enabled, OpError> {
        let _ops = lock(&self.ops);
        let item = self.find(hex)?;
        let record = self.check_allowed(&item, Op::Reprotect)?;
        if request.disks.len() != record.disks.len() {
            // The request is well formed; it does not fit this item.
            return Err(OpError::Conflict {
                code: "disk_mismatch",
                message: format!(
                    "disks: the item has {} disks, {} were given; give the original VM's disk \
                     for each, OS disk first",
                    record.disks.len(),
                    request.disks.len()
                ),
            });
        }
        let mut disks = Vec::new();
        for (index, (raw, disk)) in request.disks.iter().zip(&record.disks).enumerate() {
            let path = self.check_path(raw, &format!("disks[{index}]"))?;
            let size_bytes = disk_size(&path).map_err(|why| OpError::Conflict {
                code: "disk_mismatch",
                message: format!("disks[{index}] {}: {why}", path.display()),
            })?;
            if size_bytes != disk.size_bytes {
                return Err(OpError::Conflict {
                    code: "disk_mismatch",
                    message: format!(
                        "disks[{index}] {} is {size_bytes} bytes; disk {index} of the item is {}",
                        path.display(),
                        disk.size_bytes
                    ),
                });
            }
            disks.push(DiskSpec {
                size_mib: None,
                path: Some(path.display().to_string()),
                block_size_bytes: Some(disk.block_size_bytes),
            });
        }
        let temporary = match request.temporary_os_disk {
            Some(path) => path,
            None => {
                let os = Path::new(&request.disks[0]);
                let parent = os.parent().unwrap_or(Path::new("/"));
                parent
                    .join(format!("{}-temporary-os.vhd", sanitize(&record.name)))
                    .display()
                    .to_string()
            }
        };
        let enabled = self.enable_locked(
            EnableRequest {
                name: request.name.unwrap_or_else(|| {
                    // Within the name limit however long the item's name is.
                    let keep = MAX_NAME_CHARS - "-reverse".len();
                    let stem: String = record.name.chars().take(keep).collect();
                    format!("{stem}-reverse")
                }),
                disks,
                policy: Some(PolicyRequest {
                    keep_points: Some(record.policy.keep_points),
                    keep_minutes: Some(record.policy.keep_minutes),
                    app_consistent_minutes: Some(record.policy.app_consistent_minutes),
                }),
                temporary_os_disk: Some(temporary),
            },
            Role::Reverse,
            Some(item.hex.clone()),
        )?;
        item.transition(Event::Start(Op::Reprotect), |r| {
            r.reversed_by = Some(enabled.item.id.clone());
        })?;
        Ok(enabled)
    }
}

/// A name usable in a file name.
fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::sanitize;

    #[test]
    fn a_name_becomes_a_file_name() {
        assert_eq!(sanitize("web-01_a"), "web-01_a");
        assert_eq!(sanitize("my vm/é.x"), "my_vm___x");
    }
}
