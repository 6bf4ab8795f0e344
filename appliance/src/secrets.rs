//! Secrets of the appliance: random ids and tokens from the OS, the control API's token file,
//! and the one constant-time token comparison (data port and control API).
//!
//! - Randomness comes from the operating system ([`getrandom`]), never from a seeded RNG.
//! - Tokens are shown and stored as lowercase hex ([`hex`]): 32 random bytes, 64 digits.
//! - A presented token is compared with [`tokens_equal`] ([`subtle`]): the time taken does
//!   not depend on where the two differ (only on their lengths, which are not secret).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use anyhow::{Context, bail};
use subtle::ConstantTimeEq;

/// Name of the control API's token file in the data directory.
pub const API_TOKEN_FILE: &str = "api-token";

/// Random bytes of a token, before hex.
const TOKEN_BYTES: usize = 32;

/// `N` bytes from the operating system's random source.
pub fn random_bytes<const N: usize>() -> anyhow::Result<[u8; N]> {
    let mut out = [0u8; N];
    getrandom::fill(&mut out)
        .map_err(|e| anyhow::anyhow!("reading random bytes from the operating system: {e}"))?;
    Ok(out)
}

/// A new token: 32 random bytes as 64 lowercase hex digits.
pub fn new_token() -> anyhow::Result<String> {
    Ok(hex::encode(random_bytes::<TOKEN_BYTES>()?))
}

/// Whether a presented token equals the expected one, in time that does not depend on where
/// they differ.
pub fn tokens_equal(expected: &[u8], presented: &[u8]) -> bool {
    bool::from(expected.ct_eq(presented))
}

/// Reads the API token of `data_dir`, creating it (32 random bytes, hex, mode 0600) on first
/// start. Returns the token and whether it was just created. The caller holds the data
/// directory's lock, so no other process races the creation.
pub fn load_or_create_api_token(data_dir: &Path) -> anyhow::Result<(String, bool)> {
    let path = data_dir.join(API_TOKEN_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let token = text.trim();
            if token.len() != 2 * TOKEN_BYTES || !token.bytes().all(|b| b.is_ascii_hexdigit()) {
                bail!(
                    "{}: not an API token (64 hex digits); delete it to make a new one",
                    path.display()
                );
            }
            let mode = std::fs::metadata(&path)?.permissions().mode();
            if mode & 0o077 != 0 {
                tracing::warn!(path = %path.display(), mode = format!("{mode:o}"),
                    "API token file is readable by others; chmod 600 it");
            }
            return Ok((token.to_owned(), false));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    }
    let token = new_token()?;
    // Written to a temporary name, synced, then renamed: never an empty or half token file.
    crate::store::write_secret(data_dir, API_TOKEN_FILE, token.as_bytes())?;
    Ok((token, true))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_equal_needs_equal_bytes_and_length() {
        // From the data port's former `tokens_equal`.
        assert!(tokens_equal(b"abc", b"abc"));
        assert!(!tokens_equal(b"abc", b"abd"));
        assert!(!tokens_equal(b"abc", b"ab"));
        assert!(!tokens_equal(b"abc", b"abcd"));
        assert!(!tokens_equal(b"", b"\xff"));
        // From the control API's former `same_token`.
        assert!(tokens_equal(b"abcd", b"abcd"));
        assert!(!tokens_equal(b"abcd", b"abce"));
        assert!(!tokens_equal(b"abcd", b"abc"));
        assert!(!tokens_equal(b"abcd", b""));
    }

    #[test]
    fn new_tokens_are_64_hex_digits_and_differ() {
        let (a, b) = (new_token().expect("token"), new_token().expect("token"));
        assert_eq!(a.len(), 64);
        assert!(
            a.bytes()
                .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
        );
        assert_ne!(a, b);
    }

    #[test]
    fn token_is_created_once_with_mode_0600_and_then_reused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (token, created) = load_or_create_api_token(dir.path()).expect("create");
        assert!(created);
        assert_eq!(token.len(), 64);
        let mode = std::fs::metadata(dir.path().join(API_TOKEN_FILE))
            .expect("metadata")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(
            load_or_create_api_token(dir.path()).expect("reuse"),
            (token, false)
        );
        std::fs::write(dir.path().join(API_TOKEN_FILE), "short").expect("write");
        assert!(load_or_create_api_token(dir.path()).is_err());
    }
}
