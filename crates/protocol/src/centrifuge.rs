//! Centrifugo's bidirectional client protocol (v2), in both of its encodings.
//!
//! The messages follow `definitions/client.proto` of centrifugal/protocol, field for
//! field where this server uses them (fields it has no use for are left out: a decoder
//! skips them, as Protobuf and JSON readers skip what they do not know). Each type is
//! both a Protobuf message (`prost`) and a JSON object (`serde`), with the proto's field
//! names; JSON leaves out zero values, as the SDKs expect, and carries `bytes` fields
//! (publication data, connection info) as raw JSON rather than base64.
//!
//! A frame holds one or more messages: in JSON one per line, in Protobuf each after its
//! length as a varint ([`decode_commands`], [`encode_reply`]). An empty command is a
//! pong, an empty reply a ping.

use std::collections::HashMap;

use bytes::{BufMut, Bytes, BytesMut};
use prost::Message as _;
use serde::{Deserialize, Serialize};

/// The two encodings; a connection keeps the one it opened with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Json,
    Protobuf,
}

/// The WebSocket subprotocol that selects Protobuf.
pub const PROTOBUF_SUBPROTOCOL: &str = "centrifuge-protobuf";

/// `bytes` fields: raw JSON in the JSON encoding.
mod raw {
    use serde::de::Error as _;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    use serde_json::value::RawValue;

    pub(super) fn serialize<S: Serializer>(bytes: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
        let bytes = super::one_line(bytes);
        let text = std::str::from_utf8(&bytes).unwrap_or("null");
        match RawValue::from_string(text.to_owned()) {
            Ok(raw) => raw.serialize(serializer),
            // Not JSON (it came in over Protobuf): what a JSON client can still read.
            Err(_) => serde_json::Value::Null.serialize(serializer),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Vec<u8>, D::Error> {
        let raw = Box::<RawValue>::deserialize(deserializer).map_err(D::Error::custom)?;
        Ok(raw.get().as_bytes().to_vec())
    }
}

/// JSON on one line: the JSON encoding puts one message per line, so a newline inside
/// a value (where it can only be whitespace) would cut a message in two for the SDKs.
pub fn one_line(json: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    if json.contains(&b'\n') {
        std::borrow::Cow::Owned(
            json.iter()
                .map(|&b| if b == b'\n' { b' ' } else { b })
                .collect(),
        )
    } else {
        std::borrow::Cow::Borrowed(json)
    }
}

fn is_zero_u32(value: &u32) -> bool {
    *value == 0
}

fn is_zero_u64(value: &u64) -> bool {
    *value == 0
}

fn is_zero_i32(value: &i32) -> bool {
    *value == 0
}

fn is_false(value: &bool) -> bool {
    !*value
}

/// What a client sends: an id and one request (none at all: a pong).
#[derive(Clone, PartialEq, prost::Message, Serialize, Deserialize)]
#[serde(default)]
pub struct Command {
    #[prost(uint32, tag = "1")]
    #[serde(skip_serializing_if = "is_zero_u32")]
    pub id: u32,
    #[prost(message, optional, tag = "4")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connect: Option<ConnectRequest>,
    #[prost(message, optional, tag = "5")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subscribe: Option<SubscribeRequest>,
    #[prost(message, optional, tag = "6")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unsubscribe: Option<ChannelRequest>,
    #[prost(message, optional, tag = "7")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub publish: Option<PublishRequest>,
    #[prost(message, optional, tag = "8")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub presence: Option<ChannelRequest>,
    #[prost(message, optional, tag = "9")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub presence_stats: Option<ChannelRequest>,
    #[prost(message, optional, tag = "10")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub history: Option<HistoryRequest>,
    #[prost(message, optional, tag = "11")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ping: Option<Empty>,
    #[prost(message, optional, tag = "12")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub send: Option<SendRequest>,
    #[prost(message, optional, tag = "13")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rpc: Option<RpcRequest>,
    #[prost(message, optional, tag = "14")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refresh: Option<RefreshRequest>,
    #[prost(message, optional, tag = "15")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sub_refresh: Option<SubRefreshRequest>,
}

/// A request that names only a channel (`unsubscribe`, `presence`, `presence_stats`).
#[derive(Clone, PartialEq, prost::Message, Serialize, Deserialize)]
#[serde(default)]
pub struct ChannelRequest {
    #[prost(string, tag = "1")]
    pub channel: String,
}

/// A message with no fields (`ping`, and results that carry nothing).
#[derive(Clone, PartialEq, prost::Message, Serialize, Deserialize)]
pub struct Empty {}

#[derive(Clone, PartialEq, prost::Message, Serialize, Deserialize)]
#[serde(default)]
pub struct ConnectRequest {
    #[prost(string, tag = "1")]
    #[serde(skip_serializing_if = "String::is_empty")]
    pub token: String,
    #[prost(bytes = "vec", tag = "2")]
    #[serde(with = "raw", skip_serializing_if = "Vec::is_empty")]
    pub data: Vec<u8>,
    #[prost(map = "string, message", tag = "3")]
    #[serde(skip_serializing_if = "HashMap::is_empty")]
    pub subs: HashMap<String, SubscribeRequest>,
    #[prost(string, tag = "4")]
    #[serde(skip_serializing_if = "String::is_empty")]
    pub name: String,
    #[prost(string, tag = "5")]
    #[serde(skip_serializing_if = "String::is_empty")]
    pub version: String,
}

#[derive(Clone, PartialEq, prost::Message, Serialize, Deserialize)]
#[serde(default)]
pub struct SubscribeRequest {
    #[prost(string, tag = "1")]
    pub channel: String,
    #[prost(string, tag = "2")]
    #[serde(skip_serializing_if = "String::is_empty")]
    pub token: String,
    #[prost(bool, tag = "3")]
    #[serde(skip_serializing_if = "is_false")]
    pub recover: bool,
    #[prost(string, tag = "6")]
    #[serde(skip_serializing_if = "String::is_empty")]
    pub epoch: String,
    #[prost(uint64, tag = "7")]
    #[serde(skip_serializing_if = "is_zero_u64")]
    pub offset: u64,
    #[prost(bytes = "vec", tag = "8")]
    #[serde(with = "raw", skip_serializing_if = "Vec::is_empty")]
    pub data: Vec<u8>,
    #[prost(bool, tag = "9")]
    #[serde(skip_serializing_if = "is_false")]
    pub positioned: bool,
    #[prost(bool, tag = "10")]
    #[serde(skip_serializing_if = "is_false")]
    pub recoverable: bool,
    #[prost(bool, tag = "11")]
    #[serde(skip_serializing_if = "is_false")]
    pub join_leave: bool,
}

#[derive(Clone, PartialEq, prost::Message, Serialize, Deserialize)]
#[serde(default)]
pub struct PublishRequest {
    #[prost(string, tag = "1")]
    pub channel: String,
    #[prost(bytes = "vec", tag = "2")]
    #[serde(with = "raw", skip_serializing_if = "Vec::is_empty")]
    pub data: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message, Serialize, Deserialize)]
#[serde(default)]
pub struct StreamPosition {
    #[prost(uint64, tag = "1")]
    pub offset: u64,
    #[prost(string, tag = "2")]
    pub epoch: String,
}

#[derive(Clone, PartialEq, prost::Message, Serialize, Deserialize)]
#[serde(default)]
pub struct HistoryRequest {
    #[prost(string, tag = "1")]
    pub channel: String,
    #[prost(int32, tag = "7")]
    #[serde(skip_serializing_if = "is_zero_i32")]
    pub limit: i32,
    #[prost(message, optional, tag = "8")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub since: Option<StreamPosition>,
    #[prost(bool, tag = "9")]
    #[serde(skip_serializing_if = "is_false")]
    pub reverse: bool,
}

#[derive(Clone, PartialEq, prost::Message, Serialize, Deserialize)]
#[serde(default)]
pub struct SendRequest {
    #[prost(bytes = "vec", tag = "1")]
    #[serde(with = "raw", skip_serializing_if = "Vec::is_empty")]
    pub data: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message, Serialize, Deserialize)]
#[serde(default)]
pub struct RpcRequest {
    #[prost(bytes = "vec", tag = "1")]
    #[serde(with = "raw", skip_serializing_if = "Vec::is_empty")]
    pub data: Vec<u8>,
    #[prost(string, tag = "2")]
    #[serde(skip_serializing_if = "String::is_empty")]
    pub method: String,
}

#[derive(Clone, PartialEq, prost::Message, Serialize, Deserialize)]
#[serde(default)]
pub struct RefreshRequest {
    #[prost(string, tag = "1")]
    pub token: String,
}

#[derive(Clone, PartialEq, prost::Message, Serialize, Deserialize)]
#[serde(default)]
pub struct SubRefreshRequest {
    #[prost(string, tag = "1")]
    pub channel: String,
    #[prost(string, tag = "2")]
    pub token: String,
}

/// What the server sends: the reply to command `id`, or with no id a push (or, empty, a
/// ping).
#[derive(Clone, PartialEq, prost::Message, Serialize, Deserialize)]
#[serde(default)]
pub struct Reply {
    #[prost(uint32, tag = "1")]
    #[serde(skip_serializing_if = "is_zero_u32")]
    pub id: u32,
    #[prost(message, optional, tag = "2")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<Error>,
    #[prost(message, optional, tag = "4")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub push: Option<Push>,
    #[prost(message, optional, tag = "5")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connect: Option<ConnectResult>,
    #[prost(message, optional, tag = "6")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subscribe: Option<SubscribeResult>,
    #[prost(message, optional, tag = "7")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unsubscribe: Option<Empty>,
    #[prost(message, optional, tag = "8")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub publish: Option<Empty>,
    #[prost(message, optional, tag = "9")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub presence: Option<PresenceResult>,
    #[prost(message, optional, tag = "10")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub presence_stats: Option<PresenceStatsResult>,
    #[prost(message, optional, tag = "11")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub history: Option<HistoryResult>,
    #[prost(message, optional, tag = "12")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ping: Option<Empty>,
    #[prost(message, optional, tag = "13")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rpc: Option<RpcResult>,
    #[prost(message, optional, tag = "14")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refresh: Option<RefreshResult>,
    #[prost(message, optional, tag = "15")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sub_refresh: Option<SubRefreshResult>,
}

#[derive(Clone, PartialEq, prost::Message, Serialize, Deserialize)]
#[serde(default)]
pub struct Error {
    #[prost(uint32, tag = "1")]
    pub code: u32,
    #[prost(string, tag = "2")]
    pub message: String,
    #[prost(bool, tag = "3")]
    #[serde(skip_serializing_if = "is_false")]
    pub temporary: bool,
}

#[derive(Clone, PartialEq, prost::Message, Serialize, Deserialize)]
#[serde(default)]
pub struct Push {
    #[prost(string, tag = "2")]
    #[serde(skip_serializing_if = "String::is_empty")]
    pub channel: String,
    #[prost(message, optional, tag = "4")]
    #[serde(rename = "pub", skip_serializing_if = "Option::is_none")]
    pub publication: Option<Publication>,
    #[prost(message, optional, tag = "5")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub join: Option<Presence>,
    #[prost(message, optional, tag = "6")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub leave: Option<Presence>,
    #[prost(message, optional, tag = "7")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unsubscribe: Option<Unsubscribe>,
    #[prost(message, optional, tag = "9")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subscribe: Option<Subscribe>,
    #[prost(message, optional, tag = "11")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disconnect: Option<Disconnect>,
}

#[derive(Clone, PartialEq, prost::Message, Serialize, Deserialize)]
#[serde(default)]
pub struct ClientInfo {
    #[prost(string, tag = "1")]
    pub user: String,
    #[prost(string, tag = "2")]
    pub client: String,
    #[prost(bytes = "vec", tag = "3")]
    #[serde(with = "raw", skip_serializing_if = "Vec::is_empty")]
    pub conn_info: Vec<u8>,
    #[prost(bytes = "vec", tag = "4")]
    #[serde(with = "raw", skip_serializing_if = "Vec::is_empty")]
    pub chan_info: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message, Serialize, Deserialize)]
#[serde(default)]
pub struct Publication {
    #[prost(bytes = "vec", tag = "4")]
    #[serde(with = "raw", skip_serializing_if = "Vec::is_empty")]
    pub data: Vec<u8>,
    #[prost(message, optional, tag = "5")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub info: Option<ClientInfo>,
    #[prost(uint64, tag = "6")]
    #[serde(skip_serializing_if = "is_zero_u64")]
    pub offset: u64,
    #[prost(map = "string, string", tag = "7")]
    #[serde(skip_serializing_if = "HashMap::is_empty")]
    pub tags: HashMap<String, String>,
}

/// A `join` or `leave` push.
#[derive(Clone, PartialEq, prost::Message, Serialize, Deserialize)]
#[serde(default)]
pub struct Presence {
    #[prost(message, optional, tag = "1")]
    pub info: Option<ClientInfo>,
}

#[derive(Clone, PartialEq, prost::Message, Serialize, Deserialize)]
#[serde(default)]
pub struct Unsubscribe {
    #[prost(uint32, tag = "2")]
    pub code: u32,
    #[prost(string, tag = "3")]
    pub reason: String,
}

#[derive(Clone, PartialEq, prost::Message, Serialize, Deserialize)]
#[serde(default)]
pub struct Subscribe {
    #[prost(bool, tag = "1")]
    #[serde(skip_serializing_if = "is_false")]
    pub recoverable: bool,
    #[prost(string, tag = "4")]
    #[serde(skip_serializing_if = "String::is_empty")]
    pub epoch: String,
    #[prost(uint64, tag = "5")]
    #[serde(skip_serializing_if = "is_zero_u64")]
    pub offset: u64,
    #[prost(bool, tag = "6")]
    #[serde(skip_serializing_if = "is_false")]
    pub positioned: bool,
}

#[derive(Clone, PartialEq, prost::Message, Serialize, Deserialize)]
#[serde(default)]
pub struct Disconnect {
    #[prost(uint32, tag = "1")]
    pub code: u32,
    #[prost(string, tag = "2")]
    pub reason: String,
    #[prost(bool, tag = "3")]
    #[serde(skip_serializing_if = "is_false")]
    pub reconnect: bool,
}

#[derive(Clone, PartialEq, prost::Message, Serialize, Deserialize)]
#[serde(default)]
pub struct ConnectResult {
    #[prost(string, tag = "1")]
    pub client: String,
    #[prost(string, tag = "2")]
    pub version: String,
    #[prost(bool, tag = "3")]
    #[serde(skip_serializing_if = "is_false")]
    pub expires: bool,
    #[prost(uint32, tag = "4")]
    #[serde(skip_serializing_if = "is_zero_u32")]
    pub ttl: u32,
    #[prost(map = "string, message", tag = "6")]
    #[serde(skip_serializing_if = "HashMap::is_empty")]
    pub subs: HashMap<String, SubscribeResult>,
    #[prost(uint32, tag = "7")]
    #[serde(skip_serializing_if = "is_zero_u32")]
    pub ping: u32,
    #[prost(bool, tag = "8")]
    #[serde(skip_serializing_if = "is_false")]
    pub pong: bool,
    /// The session an emulated transport's commands name (`POST /emulation`).
    #[prost(string, tag = "9")]
    #[serde(skip_serializing_if = "String::is_empty")]
    pub session: String,
    #[prost(string, tag = "10")]
    #[serde(skip_serializing_if = "String::is_empty")]
    pub node: String,
}

#[derive(Clone, PartialEq, prost::Message, Serialize, Deserialize)]
#[serde(default)]
pub struct SubscribeResult {
    #[prost(bool, tag = "1")]
    #[serde(skip_serializing_if = "is_false")]
    pub expires: bool,
    #[prost(uint32, tag = "2")]
    #[serde(skip_serializing_if = "is_zero_u32")]
    pub ttl: u32,
    #[prost(bool, tag = "3")]
    #[serde(skip_serializing_if = "is_false")]
    pub recoverable: bool,
    #[prost(string, tag = "6")]
    #[serde(skip_serializing_if = "String::is_empty")]
    pub epoch: String,
    #[prost(message, repeated, tag = "7")]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub publications: Vec<Publication>,
    #[prost(bool, tag = "8")]
    #[serde(skip_serializing_if = "is_false")]
    pub recovered: bool,
    #[prost(uint64, tag = "9")]
    #[serde(skip_serializing_if = "is_zero_u64")]
    pub offset: u64,
    #[prost(bool, tag = "10")]
    #[serde(skip_serializing_if = "is_false")]
    pub positioned: bool,
    #[prost(bool, tag = "12")]
    #[serde(skip_serializing_if = "is_false")]
    pub was_recovering: bool,
}

#[derive(Clone, PartialEq, prost::Message, Serialize, Deserialize)]
#[serde(default)]
pub struct PresenceResult {
    #[prost(map = "string, message", tag = "1")]
    pub presence: HashMap<String, ClientInfo>,
}

#[derive(Clone, PartialEq, prost::Message, Serialize, Deserialize)]
#[serde(default)]
pub struct PresenceStatsResult {
    #[prost(uint32, tag = "1")]
    pub num_clients: u32,
    #[prost(uint32, tag = "2")]
    pub num_users: u32,
}

#[derive(Clone, PartialEq, prost::Message, Serialize, Deserialize)]
#[serde(default)]
pub struct HistoryResult {
    #[prost(message, repeated, tag = "1")]
    pub publications: Vec<Publication>,
    #[prost(string, tag = "2")]
    pub epoch: String,
    #[prost(uint64, tag = "3")]
    pub offset: u64,
}

#[derive(Clone, PartialEq, prost::Message, Serialize, Deserialize)]
#[serde(default)]
pub struct RpcResult {
    #[prost(bytes = "vec", tag = "1")]
    #[serde(with = "raw", skip_serializing_if = "Vec::is_empty")]
    pub data: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message, Serialize, Deserialize)]
#[serde(default)]
pub struct RefreshResult {
    #[prost(string, tag = "1")]
    pub client: String,
    #[prost(string, tag = "2")]
    pub version: String,
    #[prost(bool, tag = "3")]
    #[serde(skip_serializing_if = "is_false")]
    pub expires: bool,
    #[prost(uint32, tag = "4")]
    #[serde(skip_serializing_if = "is_zero_u32")]
    pub ttl: u32,
}

#[derive(Clone, PartialEq, prost::Message, Serialize, Deserialize)]
#[serde(default)]
pub struct SubRefreshResult {
    #[prost(bool, tag = "1")]
    #[serde(skip_serializing_if = "is_false")]
    pub expires: bool,
    #[prost(uint32, tag = "2")]
    #[serde(skip_serializing_if = "is_zero_u32")]
    pub ttl: u32,
}

/// Why a frame's commands could not be read: the connection is closed with 3501.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Malformed(pub String);

impl std::fmt::Display for Malformed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Malformed {}

/// The commands in one frame, at most `max` of them.
pub fn decode_commands(
    encoding: Encoding,
    frame: &[u8],
    max: usize,
) -> Result<Vec<Command>, Malformed> {
    let mut commands = Vec::new();
    match encoding {
        Encoding::Json => {
            for line in frame.split(|&b| b == b'\n') {
                let line = line.trim_ascii();
                if line.is_empty() {
                    continue;
                }
                if commands.len() == max {
                    return Err(Malformed(format!("more than {max} commands in a frame")));
                }
                let command: Command = serde_json::from_slice(line)
                    .map_err(|e| Malformed(format!("a command is not valid JSON: {e}")))?;
                commands.push(command);
            }
            if commands.is_empty() {
                return Err(Malformed("a frame without a command".into()));
            }
        }
        Encoding::Protobuf => {
            let mut rest = frame;
            while !rest.is_empty() {
                if commands.len() == max {
                    return Err(Malformed(format!("more than {max} commands in a frame")));
                }
                let length = prost::encoding::decode_varint(&mut rest)
                    .map_err(|e| Malformed(format!("a command's length: {e}")))?;
                let length = usize::try_from(length)
                    .ok()
                    .filter(|&n| n <= rest.len())
                    .ok_or_else(|| Malformed("a command longer than its frame".into()))?;
                let (message, after) = rest.split_at(length);
                let command = Command::decode(message)
                    .map_err(|e| Malformed(format!("a command is not valid Protobuf: {e}")))?;
                commands.push(command);
                rest = after;
            }
            if commands.is_empty() {
                return Err(Malformed("a frame without a command".into()));
            }
        }
    }
    Ok(commands)
}

/// A request to `POST /emulation`: commands for the session `session` on the node
/// `node`, from a client whose server-to-client half is an HTTP stream or SSE.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct EmulationRequest {
    #[prost(string, tag = "1")]
    pub node: String,
    #[prost(string, tag = "2")]
    pub session: String,
    /// The commands, as a frame of the session's encoding.
    #[prost(bytes = "vec", tag = "3")]
    pub data: Vec<u8>,
}

/// The JSON form: `data` is the frame as a string (commands one per line).
#[derive(Deserialize)]
struct JsonEmulationRequest {
    #[serde(default)]
    node: String,
    #[serde(default)]
    session: String,
    data: String,
}

/// An emulation request's body: Protobuf when it came as `application/octet-stream`,
/// else JSON.
pub fn decode_emulation(encoding: Encoding, body: &[u8]) -> Result<EmulationRequest, Malformed> {
    match encoding {
        Encoding::Json => {
            let request: JsonEmulationRequest = serde_json::from_slice(body)
                .map_err(|e| Malformed(format!("not an emulation request: {e}")))?;
            Ok(EmulationRequest {
                node: request.node,
                session: request.session,
                data: request.data.into_bytes(),
            })
        }
        Encoding::Protobuf => EmulationRequest::decode(body)
            .map_err(|e| Malformed(format!("not an emulation request: {e}"))),
    }
}

/// An emulation request's body in `encoding` (for clients and tests).
pub fn encode_emulation(encoding: Encoding, request: &EmulationRequest) -> Bytes {
    match encoding {
        Encoding::Json => {
            let data = String::from_utf8_lossy(&request.data);
            Bytes::from(
                serde_json::to_vec(&serde_json::json!({
                    "node": request.node,
                    "session": request.session,
                    "data": data,
                }))
                .expect("requests serialize"),
            )
        }
        Encoding::Protobuf => Bytes::from(request.encode_to_vec()),
    }
}

/// One reply as a frame of its own.
pub fn encode_reply(encoding: Encoding, reply: &Reply) -> Bytes {
    match encoding {
        Encoding::Json => Bytes::from(serde_json::to_vec(reply).expect("replies serialize")),
        Encoding::Protobuf => {
            let mut out = BytesMut::with_capacity(reply.encoded_len() + 5);
            reply
                .encode_length_delimited(&mut out)
                .expect("the buffer grows");
            out.freeze()
        }
    }
}

/// One command as a frame (for clients and tests).
pub fn encode_command(encoding: Encoding, command: &Command) -> Bytes {
    match encoding {
        Encoding::Json => Bytes::from(serde_json::to_vec(command).expect("commands serialize")),
        Encoding::Protobuf => {
            let mut out = BytesMut::new();
            command
                .encode_length_delimited(&mut out)
                .expect("the buffer grows");
            out.freeze()
        }
    }
}

/// The replies in one frame (for clients and tests).
pub fn decode_replies(encoding: Encoding, frame: &[u8]) -> Result<Vec<Reply>, Malformed> {
    let mut replies = Vec::new();
    match encoding {
        Encoding::Json => {
            for line in frame.split(|&b| b == b'\n') {
                let line = line.trim_ascii();
                if !line.is_empty() {
                    replies
                        .push(serde_json::from_slice(line).map_err(|e| Malformed(e.to_string()))?);
                }
            }
        }
        Encoding::Protobuf => {
            let mut rest = frame;
            while !rest.is_empty() {
                replies.push(
                    Reply::decode_length_delimited(&mut rest)
                        .map_err(|e| Malformed(e.to_string()))?,
                );
            }
        }
    }
    Ok(replies)
}

/// Who published, as a `pub` push names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Publisher<'a> {
    pub user: &'a str,
    /// The publishing connection's client id (empty when unknown).
    pub client: &'a str,
    /// Its token's `info` (JSON; empty when none).
    pub conn_info: &'a [u8],
}

/// A `pub` push for `channel`, written directly (it is what a channel's subscribers
/// are sent most, encoded once per publication): `data` and `conn_info` must be JSON.
pub fn publication_push(
    encoding: Encoding,
    channel: &str,
    offset: u64,
    data: &[u8],
    publisher: Option<Publisher<'_>>,
    tags: &HashMap<String, String>,
) -> Bytes {
    match encoding {
        Encoding::Json => {
            let mut out = BytesMut::with_capacity(64 + channel.len() + data.len());
            out.put_slice(b"{\"push\":{\"channel\":");
            put_json_str(&mut out, channel);
            out.put_slice(b",\"pub\":{\"data\":");
            out.put_slice(&one_line(data));
            if let Some(publisher) = publisher {
                out.put_slice(b",\"info\":{\"user\":");
                put_json_str(&mut out, publisher.user);
                out.put_slice(b",\"client\":");
                put_json_str(&mut out, publisher.client);
                if !publisher.conn_info.is_empty() {
                    out.put_slice(b",\"conn_info\":");
                    out.put_slice(&one_line(publisher.conn_info));
                }
                out.put_slice(b"}");
            }
            if offset > 0 {
                out.put_slice(b",\"offset\":");
                out.put_slice(offset.to_string().as_bytes());
            }
            if !tags.is_empty() {
                out.put_slice(b",\"tags\":");
                out.put_slice(&serde_json::to_vec(tags).expect("strings serialize"));
            }
            out.put_slice(b"}}}");
            out.freeze()
        }
        Encoding::Protobuf => encode_reply(
            encoding,
            &Reply {
                push: Some(Push {
                    channel: channel.to_owned(),
                    publication: Some(Publication {
                        data: data.to_vec(),
                        info: publisher.map(|p| ClientInfo {
                            user: p.user.to_owned(),
                            client: p.client.to_owned(),
                            conn_info: p.conn_info.to_vec(),
                            ..ClientInfo::default()
                        }),
                        offset,
                        tags: tags.clone(),
                    }),
                    ..Push::default()
                }),
                ..Reply::default()
            },
        ),
    }
}

fn put_json_str(out: &mut BytesMut, text: &str) {
    out.put_slice(&serde_json::to_vec(text).expect("strings serialize"));
}

/// The empty reply a ping is, in `encoding`.
pub fn ping(encoding: Encoding) -> Bytes {
    match encoding {
        Encoding::Json => Bytes::from_static(b"{}"),
        Encoding::Protobuf => Bytes::from_static(&[0]),
    }
}

/// Whether `command` is a pong (a command with no id and no request).
pub fn is_pong(command: &Command) -> bool {
    *command == Command::default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_commands_are_read_line_by_line_with_raw_data() {
        let frame = b"{\"id\":1,\"connect\":{\"token\":\"t\",\"name\":\"js\"}}\n{\"id\":2,\"publish\":{\"channel\":\"c\",\"data\":{\"a\":[1,2]}}}\n{}";
        let commands = decode_commands(Encoding::Json, frame, 10).unwrap();
        assert_eq!(commands.len(), 3);
        assert_eq!(commands[0].connect.as_ref().unwrap().token, "t");
        let publish = commands[1].publish.as_ref().unwrap();
        assert_eq!(publish.data, b"{\"a\":[1,2]}");
        assert!(is_pong(&commands[2]));
        assert!(decode_commands(Encoding::Json, b"{\"id\":", 10).is_err());
        assert!(decode_commands(Encoding::Json, b"{}\n{}\n{}", 2).is_err());
        // A publish without data writes none back (not `null`, which would read as data).
        let bare: Vec<Command> =
            decode_commands(Encoding::Json, b"{\"id\":3,\"publish\":{\"x\":{}}}", 10).unwrap();
        let again = encode_command(Encoding::Json, &bare[0]);
        assert_eq!(decode_commands(Encoding::Json, &again, 10).unwrap(), bare);
        assert!(decode_commands(Encoding::Json, b"\n", 2).is_err());
    }

    #[test]
    fn protobuf_commands_are_length_delimited() {
        let one = Command {
            id: 7,
            subscribe: Some(SubscribeRequest {
                channel: "news".into(),
                recover: true,
                offset: 12,
                epoch: "e".into(),
                ..SubscribeRequest::default()
            }),
            ..Command::default()
        };
        let mut frame = encode_command(Encoding::Protobuf, &one).to_vec();
        frame.extend_from_slice(&encode_command(Encoding::Protobuf, &Command::default()));
        let commands = decode_commands(Encoding::Protobuf, &frame, 10).unwrap();
        assert_eq!(commands, vec![one, Command::default()]);
        // A length past the end, and a varint that never ends.
        assert!(decode_commands(Encoding::Protobuf, &[5, 8], 10).is_err());
        assert!(decode_commands(Encoding::Protobuf, &[0xff; 11], 10).is_err());
    }

    #[test]
    fn the_written_push_is_the_reply_serde_would_write() {
        let tags = HashMap::from([("event".to_owned(), "tick".to_owned())]);
        for encoding in [Encoding::Json, Encoding::Protobuf] {
            let ann = Publisher {
                user: "ann",
                client: "c1",
                conn_info: b"{\"d\":[1]}",
            };
            let frame = publication_push(encoding, "a\"b", 3, b"{\"x\":1}", Some(ann), &tags);
            let replies = decode_replies(encoding, &frame).unwrap();
            let push = replies[0].push.as_ref().unwrap();
            assert_eq!(push.channel, "a\"b");
            let publication = push.publication.as_ref().unwrap();
            assert_eq!(publication.offset, 3);
            assert_eq!(publication.data, b"{\"x\":1}");
            let info = publication.info.as_ref().unwrap();
            assert_eq!((info.user.as_str(), info.client.as_str()), ("ann", "c1"));
            assert_eq!(info.conn_info, b"{\"d\":[1]}");
            assert_eq!(publication.tags, tags);
        }
    }

    #[test]
    fn json_with_newlines_stays_one_message_per_line() {
        let data = b"{\"a\":\n [1,\n2],\"s\":\"x\\ny\"}";
        let frame = publication_push(Encoding::Json, "c", 1, data, None, &HashMap::new());
        assert!(!frame.contains(&b'\n'));
        let replies = decode_replies(Encoding::Json, &frame).unwrap();
        let publication = replies[0]
            .push
            .as_ref()
            .unwrap()
            .publication
            .as_ref()
            .unwrap();
        let value: serde_json::Value = serde_json::from_slice(&publication.data).unwrap();
        assert_eq!(value, serde_json::json!({"a": [1, 2], "s": "x\ny"}));
        let reply = Reply {
            id: 1,
            history: Some(HistoryResult {
                publications: vec![
                    publication.clone(),
                    Publication {
                        data: data.to_vec(),
                        ..Publication::default()
                    },
                ],
                ..HistoryResult::default()
            }),
            ..Reply::default()
        };
        let frame = encode_reply(Encoding::Json, &reply);
        assert!(!frame.contains(&b'\n'));
        assert_eq!(decode_replies(Encoding::Json, &frame).unwrap().len(), 1);
    }

    #[test]
    fn replies_leave_out_zero_values_in_json() {
        let reply = Reply {
            id: 3,
            publish: Some(Empty {}),
            ..Reply::default()
        };
        assert_eq!(
            &encode_reply(Encoding::Json, &reply)[..],
            b"{\"id\":3,\"publish\":{}}"
        );
        assert_eq!(&ping(Encoding::Json)[..], b"{}");
        let decoded = decode_replies(Encoding::Protobuf, &ping(Encoding::Protobuf)).unwrap();
        assert_eq!(decoded, vec![Reply::default()]);
    }

    #[test]
    fn emulation_requests_carry_a_frame_in_either_encoding() {
        // What centrifuge-js posts: the frame (commands one per line) as a JSON string.
        let body = br#"{"session":"s1","node":"n1","data":"{\"id\":2,\"subscribe\":{\"channel\":\"c\"}}\n{}"}"#;
        let request = decode_emulation(Encoding::Json, body).unwrap();
        assert_eq!((&request.session[..], &request.node[..]), ("s1", "n1"));
        let commands = decode_commands(Encoding::Json, &request.data, 8).unwrap();
        assert_eq!(commands[0].subscribe.as_ref().unwrap().channel, "c");
        assert!(is_pong(&commands[1]));
        let again = decode_emulation(Encoding::Json, &encode_emulation(Encoding::Json, &request));
        assert_eq!(again.unwrap(), request);

        let frame = encode_command(Encoding::Protobuf, &commands[0]);
        let request = EmulationRequest {
            node: "n2".into(),
            session: "s2".into(),
            data: frame.to_vec(),
        };
        let body = encode_emulation(Encoding::Protobuf, &request);
        assert_eq!(
            decode_emulation(Encoding::Protobuf, &body).unwrap(),
            request
        );

        for bad in [&b"{}"[..], b"[1]", b"{\"data\":7}", b"\xff"] {
            assert!(decode_emulation(Encoding::Json, bad).is_err(), "{bad:?}");
        }
        assert!(decode_emulation(Encoding::Protobuf, &[0x1a, 0x05, 1]).is_err());
    }
}
