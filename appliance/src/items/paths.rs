//! Request paths: resolved, checked against the data directory and disk stores, disk sizes.

use std::fs::File;
use std::os::unix::fs::FileTypeExt;
use std::path::{Component, Path, PathBuf};

use super::error::{OpError, bad};
use super::manager::Manager;

/// Names under the data directory that requests may not touch.
const RESERVED_NAMES: [&str; 8] = [
    "items",
    "slots",
    "jobs",
    "meta.redb",
    "control.redb",
    "api-token",
    "lock",
    "api-token.tmp",
];

impl Manager {
    /// Resolves a request path: absolute, no `..`, inside the data directory (but not its
    /// own files) or a disk store, following symlinks of the part that exists.
    pub(super) fn check_path(&self, raw: &str, field: &str) -> Result<PathBuf, OpError> {
        let refused = |why: String| OpError::PathRefused {
            field: field.to_owned(),
            message: format!("{field} {raw:?}: {why}"),
        };
        let path = Path::new(raw);
        if raw.is_empty() || !path.is_absolute() {
            return Err(refused("must be an absolute path".into()));
        }
        if raw.contains('\0') {
            return Err(bad(field, "contains a NUL byte, which no path can"));
        }
        check_path_lengths(raw).map_err(refused)?;
        if path.components().any(|c| matches!(c, Component::ParentDir)) {
            return Err(refused("must not contain \"..\"".into()));
        }
        // Canonicalize the longest existing prefix, then append the rest.
        let mut existing = path.to_path_buf();
        let mut rest = Vec::new();
        let canonical = loop {
            match std::fs::canonicalize(&existing) {
                Ok(canonical) => break canonical,
                Err(_) => match (existing.file_name(), existing.parent()) {
                    (Some(name), Some(parent)) => {
                        rest.push(name.to_owned());
                        existing = parent.to_path_buf();
                    }
                    _ => return Err(refused("cannot be resolved".into())),
                },
            }
        };
        let resolved = rest
            .iter()
            .rev()
            .fold(canonical, |acc, part| acc.join(part));
        // Symlinks in the existing part may have made it longer.
        check_path_lengths(&resolved.display().to_string())
            .map_err(|why| refused(format!("resolves to {}: {why}", resolved.display())))?;
        let inside_data = resolved.strip_prefix(&self.root).ok().map(|relative| {
            relative
                .components()
                .next()
                .and_then(|c| c.as_os_str().to_str())
                .is_none_or(|first| !RESERVED_NAMES.contains(&first))
        });
        let allowed = match inside_data {
            Some(true) => resolved != self.root,
            Some(false) => false,
            None => self.roots[1..]
                .iter()
                .any(|store| resolved.starts_with(store)),
        };
        if !allowed {
            let stores: Vec<String> = self.roots.iter().map(|r| r.display().to_string()).collect();
            return Err(refused(format!(
                "resolves to {}, which is not inside the data directory or a disk store ({}), \
                 or is one of the appliance's own files",
                resolved.display(),
                stores.join(", ")
            )));
        }
        Ok(resolved)
    }
}

/// Size of a disk file or block device, or why it is not a disk.
pub(super) fn disk_size(path: &Path) -> Result<u64, String> {
    let metadata = std::fs::metadata(path).map_err(|e| format!("cannot stat: {e}"))?;
    let kind = metadata.file_type();
    if kind.is_file() {
        Ok(metadata.len())
    } else if kind.is_block_device() {
        use std::io::Seek;
        File::open(path)
            .and_then(|mut f| f.seek(std::io::SeekFrom::End(0)))
            .map_err(|e| format!("cannot read its size: {e}"))
    } else {
        Err("not a regular file or block device".into())
    }
}

/// Longest path component (NAME_MAX) and whole path (PATH_MAX without its NUL), in bytes.
pub(super) const MAX_COMPONENT_BYTES: usize = 255;
pub(super) const MAX_PATH_BYTES: usize = 4095;

/// The lengths the kernel refuses with ENAMETOOLONG, checked before any file is touched.
pub(super) fn check_path_lengths(path: &str) -> Result<(), String> {
    if path.len() > MAX_PATH_BYTES {
        return Err(format!(
            "is {} bytes long; a path has at most {MAX_PATH_BYTES}",
            path.len()
        ));
    }
    match path.split('/').find(|c| c.len() > MAX_COMPONENT_BYTES) {
        Some(component) => Err(format!(
            "has a component of {} bytes; a file name has at most {MAX_COMPONENT_BYTES}",
            component.len()
        )),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests;
