//! Why an operation was refused or failed (`OpError`); the API maps each to a status.

use engine::dirfd::DirError;
use engine::error::report;

use super::model::ItemState;

/// Why an operation was refused or failed; the API maps each to a status.
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    /// 400: the request is malformed.
    #[error("{message}")]
    BadRequest {
        /// `bad_request`, or `bad_item_id` for a malformed id in the path.
        code: &'static str,
        /// The field at fault.
        field: Option<String>,
        /// What is wrong.
        message: String,
    },
    /// 403: a path outside the allowed directories.
    #[error("{message}")]
    PathRefused {
        /// The field.
        field: String,
        /// Why.
        message: String,
    },
    /// 404.
    #[error("{message}")]
    NotFound {
        /// `item_not_found`, `job_not_found`, `point_not_found`.
        code: &'static str,
        /// What was not found.
        message: String,
    },
    /// 409: the item's state does not allow the operation.
    #[error("item {item} is {state}; {op} is not allowed (allowed: {})", allowed_list(.allowed))]
    WrongState {
        /// Item id.
        item: String,
        /// Its state.
        state: ItemState,
        /// The operation asked for.
        op: &'static str,
        /// What is allowed.
        allowed: Vec<&'static str>,
    },
    /// 409: not enough free slots.
    #[error("needs {needed} free data-disk slots, {free} are free; nothing was changed")]
    NotEnoughSlots {
        /// Slots needed.
        needed: usize,
        /// Slots free.
        free: usize,
    },
    /// 409: another conflict.
    #[error("{message}")]
    Conflict {
        /// `path_in_use`, `target_dir_busy`, `target_changed`, `job_running`,
        /// `too_many_jobs`, `disk_mismatch`.
        code: &'static str,
        /// What conflicts.
        message: String,
    },
    /// 500: a real I/O failure.
    #[error("{0}")]
    Io(String),
}

fn allowed_list(allowed: &[&'static str]) -> String {
    if allowed.is_empty() {
        "none while its job runs".into()
    } else {
        allowed.join(", ")
    }
}

impl From<anyhow::Error> for OpError {
    fn from(error: anyhow::Error) -> Self {
        Self::Io(crate::store::describe(&error))
    }
}

pub(super) fn bad(field: impl Into<String>, message: impl Into<String>) -> OpError {
    let field = field.into();
    OpError::BadRequest {
        code: "bad_request",
        message: format!("{field}: {}", message.into()),
        field: Some(field),
    }
}

/// The API's answer to a refused target-directory operation of a request.
pub fn dir_refusal(field: &str, error: DirError) -> OpError {
    let message = format!("{field}: {}", report(&error));
    match &error {
        DirError::Symlink { .. } => OpError::PathRefused {
            field: field.to_owned(),
            message,
        },
        DirError::NotADirectory { .. } | DirError::BadName { .. } => OpError::BadRequest {
            code: "bad_request",
            field: Some(field.to_owned()),
            message,
        },
        DirError::Io { source, .. }
            if source.raw_os_error() == Some(nix::errno::Errno::ENAMETOOLONG as i32) =>
        {
            OpError::BadRequest {
                code: "bad_request",
                field: Some(field.to_owned()),
                message,
            }
        }
        DirError::Exists { .. } => OpError::Conflict {
            code: "path_in_use",
            message: format!("{message} (files are never overwritten)"),
        },
        DirError::NotOurs { .. } => OpError::Conflict {
            code: "target_changed",
            message,
        },
        _ => OpError::Io(message),
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    #[test]
    fn target_dir_errors_map_to_their_statuses() {
        let path = PathBuf::from("/data/out");
        let symlink = dir_refusal("target_dir", DirError::Symlink { path: path.clone() });
        assert!(
            matches!(symlink, OpError::PathRefused { .. }),
            "{symlink:?}"
        );
        let not_dir = dir_refusal("target_dir", DirError::NotADirectory { path: path.clone() });
        assert!(
            matches!(
                not_dir,
                OpError::BadRequest {
                    code: "bad_request",
                    ..
                }
            ),
            "{not_dir:?}"
        );
        let exists = dir_refusal("target_dir", DirError::Exists { path });
        match exists {
            OpError::Conflict { code, message } => {
                assert_eq!(code, "path_in_use");
                assert!(
                    message.ends_with("(files are never overwritten)"),
                    "{message}"
                );
                assert!(message.starts_with("target_dir: "), "{message}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_bad_field_names_the_field() {
        match bad("policy.keep_points", "must be 1..=100000") {
            OpError::BadRequest {
                code,
                field,
                message,
            } => {
                assert_eq!(code, "bad_request");
                assert_eq!(field.as_deref(), Some("policy.keep_points"));
                assert_eq!(message, "policy.keep_points: must be 1..=100000");
            }
            other => panic!("{other:?}"),
        }
    }
}
