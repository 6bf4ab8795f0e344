//! A data directory written by the first release (commit 49e16ed: records in `item.json`, jobs
//! in `jobs/<id>.json`, the slot pages) is migrated into `control.redb` at the first start:
//! every item, point, job and slot is found through the API as the first release showed them,
//! the old files are gone, a restart finds the same, and a migration interrupted after its
//! commit runs again to the same store.
//!
//! The fixture, `fixtures/datadir-v1.tar.gz`, was made by `appliance/examples/make_v1_fixture.rs`
//! from the first release's binary (see that file for the commands); it unpacks to
//! `/tmp/appliance-v1-fixture/` (`data/` with `data/failover-gamma/`, and `expected.json`: what the first
//! release's API answered), at that fixed path because records hold absolute paths.

// Shared with the other test binaries, which allow its unwraps crate-wide; here only it.
#[allow(clippy::unwrap_used)]
mod common;

use std::path::{Path, PathBuf};

use appliance::db::ControlStore;
use appliance::db::migrate_v1::{Migrated, migrate};
use common::Server;
use serde_json::Value;

const ROOT: &str = "/tmp/appliance-v1-fixture";

/// Holds the fixture's fixed path for one test at a time (an flock on a file beside it).
struct Unpacked {
    _lock: nix::fcntl::Flock<std::fs::File>,
}

impl Unpacked {
    fn root(&self) -> PathBuf {
        PathBuf::from(ROOT)
    }

    fn data(&self) -> PathBuf {
        self.root().join("data")
    }
}

impl Drop for Unpacked {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(ROOT);
    }
}

/// Unpacks the fixture at its fixed path (replacing what a crashed run left).
fn unpack() -> Unpacked {
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(format!("{ROOT}.lock"))
        .expect("the fixture's lock file");
    let lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, errno)| errno)
        .expect("locking the fixture's path");
    let _ = std::fs::remove_dir_all(ROOT);
    extract();
    Unpacked { _lock: lock }
}

/// Unpacks the fixture's files over whatever is at its path.
fn extract() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/datadir-v1.tar.gz");
    let status = std::process::Command::new("tar")
        .arg("-xzf")
        .arg(&fixture)
        .args(["-C", "/tmp"])
        .status()
        .expect("running tar");
    assert!(status.success(), "unpacking {}", fixture.display());
}

fn json_file(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).expect("the file")).expect("JSON")
}

/// The first release's files of a data directory.
fn v1_files(data: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(data.join("items")).expect("items/") {
        let record = entry.expect("an entry").path().join("item.json");
        if record.exists() {
            found.push(record);
        }
    }
    for dir in ["jobs", "slots"] {
        if let Ok(entries) = std::fs::read_dir(data.join(dir)) {
            found.extend(entries.map(|e| e.expect("an entry").path()));
        }
    }
    found.sort();
    found
}

/// The API answers that must survive the migration.
fn check_as_expected(server: &Server, expected: &Value) {
    let items = server.expect("GET", "/v1/items", None, 200);
    let items = items.as_array().expect("a list");
    let before = expected["items"].as_array().expect("the expected items");
    assert_eq!(items.len(), before.len(), "{items:?}");
    for old in before {
        let new = items
            .iter()
            .find(|i| i["id"] == old["id"])
            .unwrap_or_else(|| panic!("item {} is listed", old["id"]));
        for key in [
            "name", "state", "role", "disks", "policy", "failover", "last_job",
        ] {
            assert_eq!(new[key], old[key], "item {} {key}", old["id"]);
        }
        let id = old["id"].as_str().expect("an id");
        let points = server.expect("GET", &format!("/v1/items/{id}/points"), None, 200);
        assert_eq!(points, expected["points"][id], "points of {id}");
    }
    let jobs = server.expect("GET", "/v1/jobs", None, 200);
    let jobs = jobs.as_array().expect("a list");
    let before = expected["jobs"].as_array().expect("the expected jobs");
    assert_eq!(jobs.len(), before.len(), "{jobs:?}");
    for old in before {
        let new = server.expect("GET", &format!("/v1/jobs/{}", old["id"]), None, 200);
        for key in [
            "id",
            "kind",
            "item",
            "state",
            "created_ns",
            "finished_ns",
            "error",
        ] {
            assert_eq!(new[key], old[key], "job {} {key}", old["id"]);
        }
        if old["state"] != "running" {
            assert_eq!(new, *old, "a finished job is as it was");
        }
    }
    assert_eq!(
        server.expect("GET", "/v1/slots", None, 200),
        expected["slots"],
        "the slot table"
    );
}

#[test]
fn a_first_release_data_directory_is_migrated_at_the_first_start() {
    let fixture = unpack();
    let data = fixture.data();
    let expected = json_file(&fixture.root().join("expected.json"));
    let states: Vec<&str> = expected["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|i| i["state"].as_str().expect("a state"))
        .collect();
    assert_eq!(states.len(), 3, "the fixture has three items: {states:?}");
    for state in ["protected", "initial_replication", "failed_over"] {
        assert!(states.contains(&state), "an item {state}: {states:?}");
    }
    assert!(
        expected["slots"]["attached"].as_u64() == Some(4),
        "slots in use: {}",
        expected["slots"]
    );
    let old_files = v1_files(&data);
    assert!(
        old_files
            .iter()
            .filter(|p| p.ends_with("item.json"))
            .count()
            == 3
            && old_files.iter().any(|p| p.ends_with("slots-a.page"))
            && old_files
                .iter()
                .any(|p| p.extension().is_some_and(|e| e == "json")
                    && p.parent().is_some_and(|d| d.ends_with("jobs"))),
        "the first release's files: {old_files:?}"
    );

    let server = Server::start(&data, &[]);
    check_as_expected(&server, &expected);
    assert_eq!(
        v1_files(&data),
        Vec::<PathBuf>::new(),
        "the old files are gone"
    );
    assert!(data.join("control.redb").exists());

    // (Replication itself does not restart on an unpacked copy, by design: the engine
    // recorded each replica disk's inode and birth time and refuses a replaced disk. That
    // check is `engine::meta`'s, unchanged by the migration.)
    server.stop();

    // The next start finds the same (nothing is migrated twice).
    let server = Server::start(&data, &[]);
    assert_eq!(
        server.expect("GET", "/v1/slots", None, 200),
        expected["slots"]
    );
    assert_eq!(
        server
            .expect("GET", "/v1/items", None, 200)
            .as_array()
            .map(Vec::len),
        Some(3)
    );
    server.stop();
}

#[test]
fn a_migration_interrupted_after_its_commit_runs_again_to_the_same_store() {
    let fixture = unpack();
    let data = fixture.data();
    let store = ControlStore::open_data_dir(&data).expect("a new store");
    let first = migrate(&data, &store)
        .expect("the migration")
        .expect("files moved");
    assert_eq!(
        first,
        Migrated {
            records: 3,
            jobs: 4,
            slots: Some(Some(4)),
        }
    );
    let snapshot = |store: &ControlStore| {
        (
            store.records().expect("records"),
            store.jobs().expect("jobs"),
            store.slots().expect("slots"),
        )
    };
    let migrated = snapshot(&store);
    assert!(v1_files(&data).is_empty(), "the old files are gone");
    assert!(migrate(&data, &store).expect("nothing to do").is_none());

    // A crash after the commit and before the old files were removed: they are back.
    extract();
    assert!(!v1_files(&data).is_empty());
    let again = migrate(&data, &store)
        .expect("the migration again")
        .expect("files moved");
    assert_eq!(again, first);
    assert_eq!(snapshot(&store), migrated, "the same store");
    assert!(v1_files(&data).is_empty());
}
