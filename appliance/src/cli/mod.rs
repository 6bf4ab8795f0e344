//! The command-line client of the control API (`docs/design/control-api.md`): `appliance
//! status`, `items`, `enable`, `failover`, … in the same binary as the daemon, over the one
//! typed client of `appliance-api`.
//!
//! Rooms:
//! ```text
//!  mod.rs       Failure (what to print, which exit status) from the client's errors
//!  app.rs       the whole command line: clap's Cli, the daemon's and offline tools' commands
//!  dispatch.rs  runs the command named: serve, an offline tool, or a client command
//!  args.rs      the client commands' arguments, points and disks as the command line names them
//!  commands.rs  each subcommand: resolve the item, call the API, follow jobs
//!  render.rs    the API's answers for people: tables (comfy-table), sizes, times
//! ```

mod app;
mod args;
mod commands;
mod dispatch;
mod render;
#[cfg(test)]
mod tests;

pub(crate) use app::Cli;
pub use args::{ApiArgs, ClientCommand};
pub use commands::{run, show_item, show_points};
pub(crate) use dispatch::run as dispatch;

use appliance_api::Error;
use appliance_api::error::TransportKind;

/// Exit status when the input is at fault (a bad argument, 400/403/404/409 from the API).
pub const EXIT_BAD_INPUT: u8 = 2;
/// Exit status for everything else (unreachable API, 401, 5xx, a failed job).
pub const EXIT_FAILURE: u8 = 1;

/// A failed command: what to print after `error: ` and the exit status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// [`EXIT_BAD_INPUT`] or [`EXIT_FAILURE`].
    pub exit: u8,
    /// One or more lines, without the `error: ` prefix.
    pub message: String,
    /// The HTTP status when the API answered (`None`: it could not be reached, or the
    /// command line was at fault).
    pub status: Option<u16>,
}

impl Failure {
    fn bad_input(message: impl Into<String>) -> Self {
        Self {
            exit: EXIT_BAD_INPUT,
            message: message.into(),
            status: None,
        }
    }

    fn machine(message: impl Into<String>) -> Self {
        Self {
            exit: EXIT_FAILURE,
            message: message.into(),
            status: None,
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Failure {}

/// Exit status for an API error status: input errors get [`EXIT_BAD_INPUT`].
pub fn exit_for_status(status: u16) -> u8 {
    match status {
        400 | 403 | 404 | 409 => EXIT_BAD_INPUT,
        _ => EXIT_FAILURE,
    }
}

/// A non-2xx answer (its status and body) as a [`Failure`]: `<message> (HTTP <status> <code>)`, then the details
/// the error carries (state and allowed operations, needed and free slots, the field).
#[cfg(test)]
pub fn api_failure(status: u16, body: &str) -> Failure {
    Failure {
        exit: exit_for_status(status),
        message: describe_api_error(status, body),
        status: Some(status),
    }
}

/// The text of [`api_failure`].
#[cfg(test)]
pub fn describe_api_error(status: u16, body: &str) -> String {
    describe_refusal(&appliance_api::ApiRefusal::parse(status, body))
}

/// A refusal for people, with a hint where the token is when the API said 401.
fn describe_refusal(refusal: &appliance_api::ApiRefusal) -> String {
    let mut out = refusal.to_string();
    if refusal.status == 401 {
        out.push_str(
            "\n  hint: give the token with --token, APPLIANCE_TOKEN, --token-file or \
             APPLIANCE_TOKEN_FILE (it is in DATA_DIR/api-token on the appliance)",
        );
    }
    out
}

impl From<Error> for Failure {
    fn from(error: Error) -> Self {
        let hint = "is `appliance serve` running there? (--api URL or APPLIANCE_API)";
        match error {
            Error::BadUrl(message) => Self::bad_input(message),
            Error::Api(refusal) => Self {
                exit: exit_for_status(refusal.status),
                message: describe_refusal(&refusal),
                status: Some(refusal.status),
            },
            Error::Transport {
                base,
                url,
                kind,
                detail,
                ..
            } => Self::machine(match kind {
                TransportKind::Refused => format!(
                    "cannot connect to the control API at {base}: connection refused; {hint}"
                ),
                TransportKind::Timeout => {
                    format!("the control API at {base} did not answer in time ({url})")
                }
                TransportKind::HostNotFound => {
                    format!("cannot resolve the host of the control API URL {base}")
                }
                TransportKind::Connection => {
                    format!("cannot talk to the control API at {base}: {detail}; {hint}")
                }
                TransportKind::Other => format!("request to {url} failed: {detail}"),
            }),
            other @ (Error::Decode { .. } | Error::TimedOut { .. }) => Self {
                exit: EXIT_FAILURE,
                status: other.status(),
                message: other.to_string(),
            },
        }
    }
}
