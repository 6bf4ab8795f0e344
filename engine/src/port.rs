//! The data port's wire codec: the hello, the reply and the ack/close records.
//!
//! The protocol is specified in `docs/design/data-port.md`. This module is its one
//! implementation of the bytes: the server (`appliance/src/dataport.rs`) and the source
//! agent (`disk-sim/src/agent.rs`) both encode and decode through it, and keep the socket
//! I/O, timeouts and session logic themselves.
//!
//! ```text
//!  hello   (client → server, 32 + T):  "DRDP" version mode flags item_id token_len
//!                                      disk_index chunk_size token
//!                                      (flags: bit 0 = RESYNC, mode 1 only)
//!  reply   (server → client, 32 + M):  "DRDA" version status mode next_seq payload_len
//!                                      message_len reserved message
//!  record  (server → client, 16 + M):  kind reason message_len reserved seq [message]
//! ```
//!
//! Every decoder takes a fixed-size array (the caller reads exactly that many bytes), checks
//! every field against its limit and returns a typed error naming what was wrong; none of
//! them panics on any input. Code bytes come in two views: the sender's closed enums
//! ([`Status`], [`CloseReason`]) and the receiver's open ones ([`RefusalStatus`],
//! [`ReceivedCloseReason`]) that keep a code this version does not know as `Other(code)`.
//! Both views are generated from one table per code space.

use std::fmt;

/// Magic of the client's hello.
pub const HELLO_MAGIC: [u8; 4] = *b"DRDP";
/// Magic of the server's reply.
pub const REPLY_MAGIC: [u8; 4] = *b"DRDA";
/// The protocol version (the only one spoken and accepted).
pub const PROTOCOL_VERSION: u16 = 1;
/// Size of the hello before the token.
pub const HELLO_FIXED_BYTES: usize = 32;
/// Size of the reply before its message.
pub const REPLY_FIXED_BYTES: usize = 32;
/// Size of an ack or close record before a close's message.
pub const RECORD_FIXED_BYTES: usize = 16;
/// Longest token accepted.
pub const MAX_TOKEN_BYTES: usize = 256;
/// Longest message in a reply or close record (longer texts are cut at a char boundary).
pub const MAX_MESSAGE_BYTES: usize = 1024;
/// Record kind: acknowledgement of a durable sequence number.
pub const RECORD_ACK: u8 = 1;
/// Record kind: the server ends the session.
pub const RECORD_CLOSE: u8 = 2;
/// Hello flag (byte 7, bit 0), mode 1 only: this stream session is the agent's delta resync,
/// opened after it fetched the chunk hashes of every disk.
pub const HELLO_FLAG_RESYNC: u8 = 0x01;
/// Every hello flag this version defines; a hello with any other bit set is refused
/// ([`Status::BadHello`]).
pub const HELLO_FLAGS_DEFINED: u8 = HELLO_FLAG_RESYNC;

/// What a connection asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Mode {
    /// Stream delta frames into the item's staging log.
    Stream = 1,
    /// Fetch the chunk hash list of one replica disk (delta resync).
    ChunkHashes = 2,
}

impl Mode {
    /// Parses the mode byte.
    pub fn from_u8(value: u8) -> Option<Self> {
        match value {
            1 => Some(Self::Stream),
            2 => Some(Self::ChunkHashes),
            _ => None,
        }
    }
}

/// Generates, from one table of codes, the sender's closed enum (`#[repr(u8)]`, castable
/// with `as u8`) and the receiver's open enum (with `Other(code)` for unknown codes).
/// Codes under `sender_only` exist in the closed enum only (a receiver sees them as `Other`).
macro_rules! wire_codes {
    (
        $(#[$closed_meta:meta])*
        closed $Closed:ident;
        $(#[$open_meta:meta])*
        open $Open:ident, unknown $unknown:literal;
        sender_only { $( $(#[$smeta:meta])* $svariant:ident = $scode:literal => $sname:literal, )* }
        codes { $( $(#[$vmeta:meta])* $variant:ident = $code:literal => $name:literal, )* }
    ) => {
        $(#[$closed_meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        #[repr(u8)]
        pub enum $Closed {
            $( $(#[$smeta])* $svariant = $scode, )*
            $( $(#[$vmeta])* $variant = $code, )*
        }

        impl $Closed {
            /// Parses the code byte; `None` for a code this version does not define.
            pub fn from_u8(value: u8) -> Option<Self> {
                match value {
                    $( $scode => Some(Self::$svariant), )*
                    $( $code => Some(Self::$variant), )*
                    _ => None,
                }
            }

            /// A short kebab-case name, as logs and error messages show it.
            pub fn name(self) -> &'static str {
                match self {
                    $( Self::$svariant => $sname, )*
                    $( Self::$variant => $name, )*
                }
            }
        }

        impl fmt::Display for $Closed {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.name())
            }
        }

        $(#[$open_meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum $Open {
            $( $(#[$vmeta])* $variant, )*
            /// A code this side does not know.
            Other(u8),
        }

        impl $Open {
            /// Parses the code byte; an unknown code is kept as `Other(code)`.
            pub fn from_u8(code: u8) -> Self {
                match code {
                    $( $code => Self::$variant, )*
                    other => Self::Other(other),
                }
            }

            /// The code byte.
            pub fn code(self) -> u8 {
                match self {
                    $( Self::$variant => $code, )*
                    Self::Other(code) => code,
                }
            }

            /// The kebab-case name the server uses.
            pub fn name(self) -> &'static str {
                match self {
                    $( Self::$variant => $name, )*
                    Self::Other(_) => $unknown,
                }
            }
        }

        impl fmt::Display for $Open {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                match self {
                    Self::Other(code) => write!(f, concat!($unknown, "({})"), code),
                    known => f.write_str(known.name()),
                }
            }
        }
    };
}

wire_codes! {
    /// Status of the server's reply to a hello.
    closed Status;
    /// Why the server refused a hello (the reply's non-zero status byte), as a client sees it.
    open RefusalStatus, unknown "unknown-status";
    sender_only {
        /// Accepted.
        Ok = 0 => "ok",
    }
    codes {
        /// The hello is malformed (magic, reserved fields, lengths, mode arguments).
        BadHello = 1 => "bad-hello",
        /// A protocol version the server does not speak.
        UnsupportedVersion = 2 => "unsupported-version",
        /// A mode the server does not know.
        UnsupportedMode = 3 => "unsupported-mode",
        /// No such protected item.
        UnknownItem = 4 => "unknown-item",
        /// The token does not match the item's stream token.
        BadToken = 5 => "bad-token",
        /// Another session streams this item.
        Busy = 6 => "busy",
        /// The item needs a delta resync; frames are refused until it is done.
        ResyncRequired = 7 => "resync-required",
        /// The item's staging log failed; nothing is accepted until it is reopened.
        StagingFailed = 8 => "staging-failed",
        /// The port serves its maximum number of connections.
        TooManyConnections = 9 => "too-many-connections",
        /// The appliance is shutting down.
        ShuttingDown = 10 => "shutting-down",
        /// The hello did not arrive complete within the handshake timeout.
        HandshakeTimeout = 11 => "handshake-timeout",
        /// Mode 2: the item has no such disk.
        UnknownDisk = 12 => "unknown-disk",
        /// Mode 2: the chunk size is not allowed.
        InvalidChunkSize = 13 => "invalid-chunk-size",
        /// Mode 2: the hash list would exceed the configured limit.
        HashListTooLarge = 14 => "hash-list-too-large",
        /// Mode 2: reading the replica failed.
        ReplicaReadFailed = 15 => "replica-read-failed",
        /// The item is not in a replicating state (failed over, failing back, disabled, …);
        /// the message names the state. Final: retrying does not help until an operator acts.
        NotReplicating = 16 => "not-replicating",
    }
}

impl RefusalStatus {
    /// Whether retrying later may succeed (the spec's "agent" column: retry with backoff).
    pub fn is_transient(self) -> bool {
        matches!(
            self,
            Self::Busy
                | Self::TooManyConnections
                | Self::ShuttingDown
                | Self::HandshakeTimeout
                | Self::StagingFailed
        )
    }
}

wire_codes! {
    /// Why the server ends a streaming session (close record).
    closed CloseReason;
    /// Why the server ended a streaming session, as a client reads it from a close record.
    open ReceivedCloseReason, unknown "unknown-reason";
    sender_only {}
    codes {
        /// The input ended (an end frame, or the agent closed its sending half) and every
        /// durable frame was acknowledged.
        EndOfStream = 1 => "end-of-stream",
        /// A frame (or the stream header) failed a check; the message names it and why.
        CorruptFrame = 2 => "corrupt-frame",
        /// The stream is for another item, another disk layout, or starts past `next_seq`.
        WrongStream = 3 => "wrong-stream",
        /// Staging is full; retry later (acks were already slowed).
        StagingFull = 4 => "staging-full",
        /// The item needs a delta resync.
        ResyncRequired = 5 => "resync-required",
        /// The staging log failed (I/O); nothing more is acknowledged until it is reopened.
        StagingFailed = 6 => "staging-failed",
        /// Nothing was received for the idle timeout.
        IdleTimeout = 7 => "idle-timeout",
        /// The appliance is shutting down.
        ShuttingDown = 8 => "shutting-down",
        /// Reading from the connection failed.
        ReadFailed = 9 => "read-failed",
        /// A frame whose checksum holds carries a data payload that does not decode to its
        /// declared length (a zstd payload that does not decompress, decompresses short or
        /// long, or declares another content size). The sender made it so; resending the same
        /// frame cannot help. Nothing of it was staged.
        InvalidPayload = 10 => "invalid-payload",
    }
}

impl ReceivedCloseReason {
    /// Whether reconnecting and resending may succeed.
    pub fn is_transient(self) -> bool {
        !matches!(
            self,
            Self::WrongStream | Self::ResyncRequired | Self::InvalidPayload | Self::Other(_)
        )
    }
}

fn le_u16_at(bytes: &[u8], at: usize) -> u16 {
    let mut raw = [0u8; 2];
    if let Some(src) = bytes.get(at..at + 2) {
        raw.copy_from_slice(src);
    }
    u16::from_le_bytes(raw)
}

fn le_u32_at(bytes: &[u8], at: usize) -> u32 {
    let mut raw = [0u8; 4];
    if let Some(src) = bytes.get(at..at + 4) {
        raw.copy_from_slice(src);
    }
    u32::from_le_bytes(raw)
}

fn le_u64_at(bytes: &[u8], at: usize) -> u64 {
    let mut raw = [0u8; 8];
    if let Some(src) = bytes.get(at..at + 8) {
        raw.copy_from_slice(src);
    }
    u64::from_le_bytes(raw)
}

// ───────────────────────────── hello ─────────────────────────────

/// A parsed hello.
#[derive(Clone, PartialEq, Eq)]
pub struct Hello {
    /// What the connection asks for.
    pub mode: Mode,
    /// The protected item.
    pub item_id: [u8; 16],
    /// The item's stream token (1..=[`MAX_TOKEN_BYTES`] bytes).
    pub token: Vec<u8>,
    /// Mode 2: the disk whose replica is hashed; 0 in mode 1.
    pub disk_index: u16,
    /// Mode 2: the chunk size; 0 in mode 1.
    pub chunk_size_bytes: u32,
    /// Mode 1: the RESYNC flag ([`HELLO_FLAG_RESYNC`]): this session is the agent's delta
    /// resync. Always false in mode 2 (the server refuses the flag there).
    pub resync: bool,
}

impl fmt::Debug for Hello {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print a secret.
        f.debug_struct("Hello")
            .field("mode", &self.mode)
            .field("item_id", &::hex::encode(self.item_id))
            .field("token_len", &self.token.len())
            .field("disk_index", &self.disk_index)
            .field("chunk_size_bytes", &self.chunk_size_bytes)
            .field("resync", &self.resync)
            .finish()
    }
}

impl Hello {
    /// The flags byte this hello carries.
    pub fn flags(&self) -> u8 {
        if self.resync { HELLO_FLAG_RESYNC } else { 0 }
    }

    /// The wire encoding (what an agent sends), flags included. It encodes what it is given:
    /// a RESYNC flag in mode 2 is written, and refused by the server.
    pub fn encode(&self) -> Vec<u8> {
        encode_hello_bytes(
            self.mode,
            self.flags(),
            &self.item_id,
            &self.token,
            self.disk_index,
            self.chunk_size_bytes,
        )
    }
}

/// Encodes a hello without flags. The caller keeps the token within 1..=[`MAX_TOKEN_BYTES`]
/// bytes. For flags (RESYNC) build a [`Hello`] and [`encode`](Hello::encode) it.
pub fn encode_hello(
    mode: Mode,
    item_id: &[u8; 16],
    token: &[u8],
    disk_index: u16,
    chunk_size_bytes: u32,
) -> Vec<u8> {
    encode_hello_bytes(mode, 0, item_id, token, disk_index, chunk_size_bytes)
}

fn encode_hello_bytes(
    mode: Mode,
    flags: u8,
    item_id: &[u8; 16],
    token: &[u8],
    disk_index: u16,
    chunk_size_bytes: u32,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(HELLO_FIXED_BYTES + token.len());
    out.extend_from_slice(&HELLO_MAGIC);
    out.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    out.push(mode as u8);
    out.push(flags);
    out.extend_from_slice(item_id);
    out.extend_from_slice(&(token.len() as u16).to_le_bytes());
    out.extend_from_slice(&disk_index.to_le_bytes());
    out.extend_from_slice(&chunk_size_bytes.to_le_bytes());
    out.extend_from_slice(token);
    out
}

/// A hello or request the server refuses: the status and a message naming what was wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{status}: {message}")]
pub struct Refusal {
    /// The status sent.
    pub status: Status,
    /// What was wrong, for a human.
    pub message: String,
}

impl Refusal {
    /// A refusal with a message.
    pub fn new(status: Status, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }
}

/// The fixed part of a hello, checked; the token length tells how many bytes follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HelloFixed {
    /// What the connection asks for.
    pub mode: Mode,
    /// The protected item.
    pub item_id: [u8; 16],
    /// Length of the token that follows, 1..=[`MAX_TOKEN_BYTES`].
    pub token_len: usize,
    /// Mode 2: the disk; 0 in mode 1.
    pub disk_index: u16,
    /// Mode 2: the chunk size; 0 in mode 1.
    pub chunk_size_bytes: u32,
    /// Mode 1: the RESYNC flag (see [`Hello::resync`]); false in mode 2.
    pub resync: bool,
}

impl HelloFixed {
    /// The whole hello, with the token read after the fixed part.
    pub fn with_token(self, token: Vec<u8>) -> Hello {
        Hello {
            mode: self.mode,
            item_id: self.item_id,
            token,
            disk_index: self.disk_index,
            chunk_size_bytes: self.chunk_size_bytes,
            resync: self.resync,
        }
    }
}

/// Checks the fixed 32 bytes of a hello; the error is the refusal to send. Never panics.
pub fn decode_hello_fixed(raw: &[u8; HELLO_FIXED_BYTES]) -> Result<HelloFixed, Refusal> {
    if raw[0..4] != HELLO_MAGIC {
        return Err(Refusal::new(
            Status::BadHello,
            format!(
                "bad hello magic {:02x?} (expected \"DRDP\"): not a data-port client",
                &raw[0..4]
            ),
        ));
    }
    let version = le_u16_at(raw, 4);
    if version != PROTOCOL_VERSION {
        return Err(Refusal::new(
            Status::UnsupportedVersion,
            format!("protocol version {version}; this appliance speaks version {PROTOCOL_VERSION}"),
        ));
    }
    let Some(mode) = Mode::from_u8(raw[6]) else {
        return Err(Refusal::new(
            Status::UnsupportedMode,
            format!(
                "mode {}; this appliance knows 1 (stream) and 2 (chunk hashes)",
                raw[6]
            ),
        ));
    };
    let flags = raw[7];
    if flags & !HELLO_FLAGS_DEFINED != 0 {
        return Err(Refusal::new(
            Status::BadHello,
            format!(
                "hello flags {flags:#04x}: bits {:#04x} are not defined (bit 0 is RESYNC)",
                flags & !HELLO_FLAGS_DEFINED
            ),
        ));
    }
    let resync = flags & HELLO_FLAG_RESYNC != 0;
    if resync && mode != Mode::Stream {
        return Err(Refusal::new(
            Status::BadHello,
            "the RESYNC flag is for mode 1 (stream) only; a chunk-hash hello carries no flags",
        ));
    }
    let mut item_id = [0u8; 16];
    item_id.copy_from_slice(&raw[8..24]);
    let token_len = usize::from(le_u16_at(raw, 24));
    if token_len == 0 || token_len > MAX_TOKEN_BYTES {
        return Err(Refusal::new(
            Status::BadHello,
            format!("token length {token_len} outside 1..={MAX_TOKEN_BYTES}"),
        ));
    }
    let disk_index = le_u16_at(raw, 26);
    let chunk_size_bytes = le_u32_at(raw, 28);
    if mode == Mode::Stream && (disk_index != 0 || chunk_size_bytes != 0) {
        return Err(Refusal::new(
            Status::BadHello,
            format!(
                "mode 1 (stream) needs disk index 0 and chunk size 0, found {disk_index} and \
                 {chunk_size_bytes}"
            ),
        ));
    }
    Ok(HelloFixed {
        mode,
        item_id,
        token_len,
        disk_index,
        chunk_size_bytes,
        resync,
    })
}

// ───────────────────────────── reply ─────────────────────────────

/// Cuts `text` to at most [`MAX_MESSAGE_BYTES`] at a char boundary.
fn bounded_message(text: &str) -> &str {
    if text.len() <= MAX_MESSAGE_BYTES {
        return text;
    }
    let mut end = MAX_MESSAGE_BYTES;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// Encodes a reply (the payload, if any, follows it separately).
pub fn encode_reply(
    status: Status,
    mode: u8,
    next_seq: u64,
    payload_len_bytes: u64,
    message: &str,
) -> Vec<u8> {
    let message = bounded_message(message);
    let mut out = Vec::with_capacity(REPLY_FIXED_BYTES + message.len());
    out.extend_from_slice(&REPLY_MAGIC);
    out.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    out.push(status as u8);
    out.push(mode);
    out.extend_from_slice(&next_seq.to_le_bytes());
    out.extend_from_slice(&payload_len_bytes.to_le_bytes());
    out.extend_from_slice(&(message.len() as u16).to_le_bytes());
    out.extend_from_slice(&[0u8; 6]);
    out.extend_from_slice(message.as_bytes());
    out
}

/// The fixed part of a reply, checked; `message_len` bytes of message follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplyFixed {
    /// The status byte (0 = ok; see [`RefusalStatus`] for the others).
    pub status: u8,
    /// The echoed mode, 0 when the hello was not understood.
    pub mode: u8,
    /// Mode 1, status 0: the first sequence number the server wants.
    pub next_seq: u64,
    /// Mode 2, status 0: the size of the payload after the message.
    pub payload_len_bytes: u64,
    /// Length of the message that follows, ≤ [`MAX_MESSAGE_BYTES`].
    pub message_len: usize,
}

/// Why the fixed part of a reply was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReplyError {
    /// Not "DRDA".
    #[error("reply magic {0:02x?}")]
    BadMagic([u8; 4]),
    /// Another protocol version.
    #[error("reply version {0}")]
    UnsupportedVersion(u16),
    /// The message length is over [`MAX_MESSAGE_BYTES`].
    #[error("reply message of {0} bytes, over {MAX_MESSAGE_BYTES}")]
    MessageTooLong(usize),
}

/// Checks the fixed 32 bytes of a reply. Never panics.
pub fn decode_reply_fixed(raw: &[u8; REPLY_FIXED_BYTES]) -> Result<ReplyFixed, ReplyError> {
    if raw[0..4] != REPLY_MAGIC {
        let mut magic = [0u8; 4];
        magic.copy_from_slice(&raw[0..4]);
        return Err(ReplyError::BadMagic(magic));
    }
    let version = le_u16_at(raw, 4);
    if version != PROTOCOL_VERSION {
        return Err(ReplyError::UnsupportedVersion(version));
    }
    let message_len = usize::from(le_u16_at(raw, 24));
    if message_len > MAX_MESSAGE_BYTES {
        return Err(ReplyError::MessageTooLong(message_len));
    }
    Ok(ReplyFixed {
        status: raw[6],
        mode: raw[7],
        next_seq: le_u64_at(raw, 8),
        payload_len_bytes: le_u64_at(raw, 16),
        message_len,
    })
}

// ───────────────────────────── records ─────────────────────────────

/// Encodes an ack record.
pub fn encode_ack(durable_seq: u64) -> [u8; RECORD_FIXED_BYTES] {
    let mut out = [0u8; RECORD_FIXED_BYTES];
    out[0] = RECORD_ACK;
    out[8..16].copy_from_slice(&durable_seq.to_le_bytes());
    out
}

/// Encodes a close record with its message.
pub fn encode_close(reason: CloseReason, durable_seq: u64, message: &str) -> Vec<u8> {
    let message = bounded_message(message);
    let mut out = Vec::with_capacity(RECORD_FIXED_BYTES + message.len());
    out.push(RECORD_CLOSE);
    out.push(reason as u8);
    out.extend_from_slice(&(message.len() as u16).to_le_bytes());
    out.extend_from_slice(&[0u8; 4]);
    out.extend_from_slice(&durable_seq.to_le_bytes());
    out.extend_from_slice(message.as_bytes());
    out
}

/// The fixed part of a record, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Record {
    /// Every frame with a sequence number ≤ `seq` is durable.
    Ack {
        /// The durable sequence number.
        seq: u64,
    },
    /// The server ends the session; `message_len` bytes of message follow.
    Close {
        /// Why.
        reason: ReceivedCloseReason,
        /// The durable sequence number at the close.
        seq: u64,
        /// Length of the message that follows, clamped to [`MAX_MESSAGE_BYTES`].
        message_len: usize,
    },
}

impl Record {
    /// The sequence number the record carries.
    pub fn seq(&self) -> u64 {
        match *self {
            Self::Ack { seq } | Self::Close { seq, .. } => seq,
        }
    }
}

/// Why a record was not understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RecordError {
    /// A kind other than ack or close.
    #[error("record kind {kind}")]
    UnknownKind {
        /// The kind byte.
        kind: u8,
        /// The sequence number the record carries anyway.
        seq: u64,
    },
}

impl RecordError {
    /// The sequence number the record carries.
    pub fn seq(&self) -> u64 {
        match *self {
            Self::UnknownKind { seq, .. } => seq,
        }
    }
}

/// Decodes the fixed 16 bytes of a record. Never panics.
pub fn decode_record(raw: &[u8; RECORD_FIXED_BYTES]) -> Result<Record, RecordError> {
    let seq = le_u64_at(raw, 8);
    match raw[0] {
        RECORD_ACK => Ok(Record::Ack { seq }),
        RECORD_CLOSE => Ok(Record::Close {
            reason: ReceivedCloseReason::from_u8(raw[1]),
            seq,
            message_len: usize::from(le_u16_at(raw, 2)).min(MAX_MESSAGE_BYTES),
        }),
        kind => Err(RecordError::UnknownKind { kind, seq }),
    }
}

#[cfg(test)]
mod tests;
