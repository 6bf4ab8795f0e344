//! Unit tests of request paths: what a request may name, and disk sizes.

use std::sync::Arc;

use super::*;
use crate::daemon::ServeOptions;
use crate::items::Manager;

/// A manager over a fresh data directory with one disk store beside it.
fn manager() -> (tempfile::TempDir, PathBuf, Arc<Manager>) {
    let base = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let data = base.path().join("data");
    let store = base.path().join("store");
    for dir in [&data, &store] {
        std::fs::create_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    }
    let mut options = ServeOptions::offline_default();
    options.disk_stores = vec![store.clone()];
    let manager = Manager::open(&data, options).unwrap_or_else(|e| panic!("open: {e:#}"));
    let store = std::fs::canonicalize(store).unwrap_or_else(|e| panic!("{e}"));
    (base, store, manager)
}

fn refused(result: Result<PathBuf, OpError>) -> String {
    match result {
        Err(OpError::PathRefused { field, message }) => {
            assert_eq!(field, "target_dir");
            message
        }
        other => panic!("not refused: {other:?}"),
    }
}

#[test]
fn paths_inside_the_data_directory_or_a_store_are_allowed() {
    let (_base, store, manager) = manager();
    let root = manager.root().to_path_buf();
    let inside = root.join("out/disks");
    let resolved = manager.check_path(&inside.display().to_string(), "target_dir");
    assert_eq!(resolved.ok(), Some(inside));
    let in_store = store.join("vm/disk-0.raw");
    let resolved = manager.check_path(&in_store.display().to_string(), "target_dir");
    assert_eq!(resolved.ok(), Some(in_store));
}

#[test]
fn relative_parent_and_outside_paths_are_refused() {
    let (base, _store, manager) = manager();
    let message = refused(manager.check_path("out/disks", "target_dir"));
    assert!(message.contains("must be an absolute path"), "{message}");
    let root = manager.root().display().to_string();
    let message = refused(manager.check_path(&format!("{root}/a/../b"), "target_dir"));
    assert!(message.contains("\"..\""), "{message}");
    let outside = base.path().join("elsewhere").display().to_string();
    let message = refused(manager.check_path(&outside, "target_dir"));
    assert!(
        message.contains("not inside the data directory"),
        "{message}"
    );
}

#[test]
fn the_data_directory_itself_and_its_own_files_are_refused() {
    let (_base, _store, manager) = manager();
    let root = manager.root().display().to_string();
    refused(manager.check_path(&root, "target_dir"));
    for own in RESERVED_NAMES {
        refused(manager.check_path(&format!("{root}/{own}/x"), "target_dir"));
    }
}

#[test]
fn a_nul_byte_is_a_bad_request() {
    let (_base, _store, manager) = manager();
    let root = manager.root().display().to_string();
    match manager.check_path(&format!("{root}/a\0b"), "target_dir") {
        Err(OpError::BadRequest { field, .. }) => assert_eq!(field.as_deref(), Some("target_dir")),
        other => panic!("not a bad request: {other:?}"),
    }
}

#[test]
fn path_lengths_the_kernel_refuses_are_refused_first() {
    assert!(check_path_lengths("/a/b").is_ok());
    let long_name = format!("/{}", "n".repeat(MAX_COMPONENT_BYTES + 1));
    let why = check_path_lengths(&long_name).err().unwrap_or_default();
    assert!(why.contains("a file name has at most 255"), "{why}");
    let long_path = "/abc".repeat(MAX_PATH_BYTES / 4 + 1);
    let why = check_path_lengths(&long_path).err().unwrap_or_default();
    assert!(why.contains("a path has at most 4095"), "{why}");
}

#[test]
fn disk_size_of_a_file_and_of_what_is_not_a_disk() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let file = dir.path().join("disk.raw");
    let made = std::fs::File::create(&file).and_then(|f| f.set_len(3 << 20));
    assert!(made.is_ok(), "{made:?}");
    assert_eq!(disk_size(&file), Ok(3 << 20));
    assert_eq!(
        disk_size(dir.path()),
        Err("not a regular file or block device".to_owned())
    );
    let missing = disk_size(&dir.path().join("missing"))
        .err()
        .unwrap_or_default();
    assert!(missing.starts_with("cannot stat"), "{missing}");
}
