//! OpenAPI schemas the derive cannot state: the two forms of a disk, point choices (with and
//! without `"latest"`), and request paths. Each states exactly what the appliance checks,
//! so that a request valid by the document is never refused as malformed (400), and a request
//! the document calls invalid is refused.

use serde_json::{Value, json};
use utoipa::openapi::RefOr;
use utoipa::openapi::schema::Schema;

use super::{DiskSpec, MAX_NAME_CHARS};

/// A request path: absolute, no NUL byte. A path outside the data directory and the disk
/// stores, with `..`, or too long for the filesystem (a component over 255 bytes, the whole
/// over 4095 bytes) is refused with 403 `path_refused`.
const PATH_PATTERN: &str = r"^/[^\u0000]*$";
/// Item names (`EnableRequest.name`, `ReprotectRequest.name`): no control characters, at
/// least one character that is not white space. The same text is in `EnableRequest`'s
/// attribute (a derive attribute takes only a literal); a test checks they agree.
pub const NAME_PATTERN: &str = r"^[^\u0000-\u001f\u007f-\u009f]*[^\u0000-\u0020\u007f-\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000][^\u0000-\u001f\u007f-\u009f]*$";
/// Point ids written as strings (also accepted as JSON integers).
const POINT_ID_DIGITS: &str = "[0-9]{1,19}";

fn schema(value: Value) -> RefOr<Schema> {
    // The values below are fixed and valid; a failure would be a bug caught by the tests.
    match serde_json::from_value::<Schema>(value) {
        Ok(schema) => RefOr::T(schema),
        Err(error) => RefOr::T(Schema::Object(
            utoipa::openapi::ObjectBuilder::new()
                .description(Some(format!("schema error: {error}")))
                .build(),
        )),
    }
}

fn path_json(description: &str) -> Value {
    json!({
        "type": "string",
        "pattern": PATH_PATTERN,
        "minLength": 1,
        "maxLength": 4095,
        "description": description,
    })
}

/// A path field.
pub fn path() -> RefOr<Schema> {
    schema(path_json(
        "Absolute path inside the data directory or a disk store (else 403 path_refused); no \
         NUL byte.",
    ))
}

/// A path field that export mode leaves out (absent or empty).
pub fn path_unless_export() -> RefOr<Schema> {
    let mut value = path_json(
        "Copy mode: absolute path inside the data directory or a disk store (else 403 \
         path_refused); no NUL byte. Export mode: absent or empty.",
    );
    value["pattern"] = json!(format!("^$|{PATH_PATTERN}"));
    value["minLength"] = json!(0);
    schema(value)
}

/// An optional path field (`null` or absent: the default).
pub fn optional_path() -> RefOr<Schema> {
    let mut value = path_json(
        "Absolute path inside the data directory or a disk store (else 403 path_refused); no \
         NUL byte; null or absent for the default.",
    );
    value["type"] = json!(["string", "null"]);
    schema(value)
}

/// `ReprotectRequest.disks`.
pub fn reprotect_disks() -> RefOr<Schema> {
    schema(json!({
        "type": "array",
        "items": path_json("The original VM's disk (absolute path, no NUL byte)."),
        "minItems": 1,
        "maxItems": 64,
        "description": "The original VM's OS + data disks, one per disk of the item, in its \
                        order (another count: 409 disk_mismatch).",
    }))
}

fn name_json() -> Value {
    json!({
        "type": "string",
        "minLength": 1,
        "maxLength": MAX_NAME_CHARS,
        "pattern": NAME_PATTERN,
    })
}

/// An optional name.
pub fn optional_name() -> RefOr<Schema> {
    let mut value = name_json();
    value["type"] = json!(["string", "null"]);
    schema(value)
}

fn point_json(names: &[&str]) -> Value {
    let pattern = format!("^({}|{POINT_ID_DIGITS})$", names.join("|"));
    json!({
        "oneOf": [
            {"type": "integer", "minimum": 0u64, "maximum": u64::MAX,
             "description": "A point id from GET /v1/items/{id}/points."},
            {"type": "string", "pattern": pattern,
             "description": "A named choice, or a point id in decimal."},
        ]
    })
}

/// A point for test failover and change point: a processed point.
pub fn point_processed() -> RefOr<Schema> {
    schema(point_json(&[
        "latest-processed",
        "latest-app",
        "latest-app-consistent",
    ]))
}

/// A point for failover, where `latest` (apply everything received, make a point) is allowed.
pub fn point_or_latest() -> RefOr<Schema> {
    schema(point_json(&[
        "latest",
        "latest-processed",
        "latest-app",
        "latest-app-consistent",
    ]))
}

impl utoipa::PartialSchema for DiskSpec {
    fn schema() -> RefOr<Schema> {
        let block_size = json!({
            "type": ["integer", "null"],
            "enum": [512, 4096, null],
            "description": "Logical block size (default 4096).",
        });
        schema(json!({
            "description": "A replica disk: create one (`size_mib`) or attach one (`path`).",
            "oneOf": [
                {
                    "type": "object",
                    "title": "create",
                    "required": ["size_mib"],
                    "properties": {
                        "size_mib": {
                            "type": "integer", "minimum": 1, "maximum": 64u64 << 20,
                            "description": "Size of a new replica disk in MiB (at most 64 TiB; \
                                            more than the filesystem allows for one file: 409 \
                                            disk_too_large).",
                        },
                        "path": {"type": "null"},
                        "block_size_bytes": block_size,
                    },
                    "additionalProperties": false,
                },
                {
                    "type": "object",
                    "title": "attach",
                    "required": ["path"],
                    "properties": {
                        "path": path_json("An existing disk (file or block device) to attach."),
                        "size_mib": {"type": "null"},
                        "block_size_bytes": block_size,
                    },
                    "additionalProperties": false,
                },
            ],
        }))
    }
}

impl utoipa::ToSchema for DiskSpec {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_hand_written_schema_parses() {
        for (name, built) in [
            ("path", path()),
            ("optional_path", optional_path()),
            ("reprotect_disks", reprotect_disks()),
            ("optional_name", optional_name()),
            ("point_processed", point_processed()),
            ("point_or_latest", point_or_latest()),
            ("DiskSpec", <DiskSpec as utoipa::PartialSchema>::schema()),
        ] {
            let text = serde_json::to_string(&built).expect("serialize");
            assert!(!text.contains("schema error"), "{name}: {text}");
        }
    }
}
