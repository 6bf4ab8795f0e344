//! Fetching a replica's chunk hash list from the appliance (mode 2), for the delta resync.

use std::io::Read;
use std::net::SocketAddr;
use std::time::Duration;

use engine::port::{MAX_TOKEN_BYTES, Mode, RefusalStatus, encode_hello};
use engine::resync::ChunkHashes;

use super::error::AgentError;
use super::link::{HandshakeError, handshake};

/// Asks the appliance for the chunk hash list of replica `disk_index` (mode 2).
/// `timeout` bounds connect, the wait for the reply (the appliance first applies every
/// acknowledged frame, then hashes the replica: give it time for both), and each read.
/// Every refusal is returned as [`AgentError::Refused`] without retrying.
pub fn fetch_chunk_hashes(
    addr: SocketAddr,
    item_id: &[u8; 16],
    token: &[u8],
    disk_index: u16,
    chunk_size_bytes: u32,
    timeout: Duration,
    max_list_bytes: u64,
) -> Result<ChunkHashes, AgentError> {
    if token.is_empty() || token.len() > MAX_TOKEN_BYTES {
        return Err(AgentError::Config(
            "token length must be 1..=256 bytes".into(),
        ));
    }
    let hello = encode_hello(
        Mode::ChunkHashes,
        item_id,
        token,
        disk_index,
        chunk_size_bytes,
    );
    let (stream, reply) = match handshake(addr, &hello, timeout, timeout) {
        Ok(done) => done,
        Err(HandshakeError::Fatal(error)) => return Err(error),
        Err(HandshakeError::Retry { status, message }) => {
            return Err(AgentError::Refused {
                addr,
                status,
                message,
            });
        }
        Err(HandshakeError::Transient(last_error)) => {
            return Err(AgentError::Unreachable {
                addr,
                attempts: 1,
                last_error,
            });
        }
    };
    if reply.status != 0 {
        return Err(AgentError::Refused {
            addr,
            status: RefusalStatus::from_u8(reply.status),
            message: reply.message,
        });
    }
    if reply.payload_len_bytes > max_list_bytes {
        return Err(AgentError::Protocol {
            addr,
            what: format!(
                "hash list of {} bytes, over this agent's limit of {max_list_bytes}",
                reply.payload_len_bytes
            ),
        });
    }
    let mut payload = Vec::new();
    (&stream)
        .take(reply.payload_len_bytes)
        .read_to_end(&mut payload)
        .map_err(|e| AgentError::Unreachable {
            addr,
            attempts: 1,
            last_error: format!("reading the hash list: {e}"),
        })?;
    if payload.len() as u64 != reply.payload_len_bytes {
        return Err(AgentError::Protocol {
            addr,
            what: format!(
                "hash list cut at {} of {} bytes",
                payload.len(),
                reply.payload_len_bytes
            ),
        });
    }
    ChunkHashes::decode(&payload).map_err(|e| AgentError::Protocol {
        addr,
        what: format!("hash list: {e}"),
    })
}
