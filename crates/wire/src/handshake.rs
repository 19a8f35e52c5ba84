//! The HTTP/1.1 upgrade (RFC 6455 section 4): validating a client's request and building
//! the answer on the server, building a request and checking the answer on the client.
//!
//! The server side works on any header source (a parsed raw request or an HTTP library's
//! header map), so the same rules hold however the request arrived. Failures carry the
//! HTTP status to answer with.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use sha1::{Digest, Sha1};

/// Appended to the client's key before hashing (RFC 6455 section 1.3).
const ACCEPT_GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// Most headers a request or response may carry.
pub const MAX_HEADERS: usize = 64;

/// Why an upgrade was refused or failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HandshakeError {
    #[error("a WebSocket upgrade must use GET")]
    MethodNotAllowed,
    #[error("a WebSocket upgrade needs HTTP/1.1 or later")]
    HttpVersion,
    #[error("this endpoint speaks WebSocket: send a GET with `Upgrade: websocket`")]
    NotAnUpgrade,
    #[error("the Connection header must contain the `Upgrade` token")]
    ConnectionNotUpgrade,
    #[error("unsupported Sec-WebSocket-Version; this server speaks version 13")]
    UnsupportedVersion,
    #[error("missing Sec-WebSocket-Key")]
    MissingKey,
    #[error("Sec-WebSocket-Key must be 16 bytes in base64")]
    InvalidKey,
    #[error("malformed header {0}")]
    InvalidHeader(&'static str),
    #[error("malformed HTTP message: {0}")]
    Malformed(String),
    #[error("request headers are too large")]
    TooLarge,
    #[error("the server answered {status} {reason} instead of 101 Switching Protocols")]
    UnexpectedStatus { status: u16, reason: String },
    #[error("Sec-WebSocket-Accept does not match the key sent")]
    AcceptMismatch,
    #[error("the server chose an extension that was not offered: {0}")]
    UnofferedExtension(String),
    #[error("the server chose a subprotocol that was not offered: {0}")]
    UnofferedProtocol(String),
}

impl HandshakeError {
    /// The HTTP status a server answers this failure with.
    pub fn status(&self) -> u16 {
        match self {
            Self::MethodNotAllowed => 405,
            Self::NotAnUpgrade | Self::UnsupportedVersion => 426,
            Self::TooLarge => 431,
            _ => 400,
        }
    }

    /// Extra headers that belong with [`HandshakeError::status`].
    pub fn response_headers(&self) -> &'static [(&'static str, &'static str)] {
        match self {
            Self::MethodNotAllowed => &[("Allow", "GET")],
            Self::NotAnUpgrade => &[("Upgrade", "websocket"), ("Connection", "Upgrade")],
            Self::UnsupportedVersion => &[("Sec-WebSocket-Version", "13")],
            _ => &[],
        }
    }
}

/// `Sec-WebSocket-Accept` for a client's key.
pub fn accept_key(key: &[u8]) -> String {
    let mut sha = Sha1::new();
    sha.update(key);
    sha.update(ACCEPT_GUID);
    BASE64.encode(sha.finalize())
}

/// A `Sec-WebSocket-Key` from 16 random bytes the caller provides.
pub fn client_key(nonce: [u8; 16]) -> String {
    BASE64.encode(nonce)
}

/// One extension offered or accepted in `Sec-WebSocket-Extensions`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extension {
    pub name: String,
    pub params: Vec<(String, Option<String>)>,
}

fn is_tchar(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c)
}

/// Parses a `Sec-WebSocket-Extensions` value (RFC 6455 section 9.1): a comma list of
/// tokens, each with `;`-separated parameters whose values are tokens or quoted strings.
pub fn parse_extensions(value: &str) -> Result<Vec<Extension>, HandshakeError> {
    const BAD: HandshakeError = HandshakeError::InvalidHeader("Sec-WebSocket-Extensions");
    let bytes = value.as_bytes();
    let mut at = 0;
    let skip_ws = |at: &mut usize| {
        while *at < bytes.len() && (bytes[*at] == b' ' || bytes[*at] == b'\t') {
            *at += 1;
        }
    };
    let token = |at: &mut usize| -> Result<String, HandshakeError> {
        let start = *at;
        while *at < bytes.len() && is_tchar(bytes[*at]) {
            *at += 1;
        }
        if *at == start {
            return Err(BAD);
        }
        Ok(value[start..*at].to_owned())
    };
    let mut extensions = Vec::new();
    loop {
        skip_ws(&mut at);
        if at == bytes.len() {
            // Empty list elements are allowed by the `#` rule; an empty header is not.
            return if extensions.is_empty() {
                Err(BAD)
            } else {
                Ok(extensions)
            };
        }
        if bytes[at] == b',' {
            at += 1;
            continue;
        }
        let mut extension = Extension {
            name: token(&mut at)?,
            params: Vec::new(),
        };
        loop {
            skip_ws(&mut at);
            match bytes.get(at) {
                None | Some(b',') => break,
                Some(b';') => at += 1,
                Some(_) => return Err(BAD),
            }
            skip_ws(&mut at);
            let name = token(&mut at)?;
            skip_ws(&mut at);
            let value = if bytes.get(at) == Some(&b'=') {
                at += 1;
                skip_ws(&mut at);
                if bytes.get(at) == Some(&b'"') {
                    at += 1;
                    let mut text = String::new();
                    loop {
                        match bytes.get(at) {
                            None => return Err(BAD),
                            Some(b'"') => {
                                at += 1;
                                break;
                            }
                            Some(b'\\') => {
                                let c = *bytes.get(at + 1).ok_or(BAD)?;
                                text.push(char::from(c));
                                at += 2;
                            }
                            Some(&c) => {
                                text.push(char::from(c));
                                at += 1;
                            }
                        }
                    }
                    // RFC 6455 9.1: a quoted value must still be a token once unquoted.
                    if text.is_empty() || !text.bytes().all(is_tchar) {
                        return Err(BAD);
                    }
                    Some(text)
                } else {
                    Some(token(&mut at)?)
                }
            } else {
                None
            };
            extension.params.push((name, value));
        }
        extensions.push(extension);
    }
}

/// Splits a comma list header value into trimmed, non-empty items.
fn list_items(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&b| b == b',')
        .map(|item| item.trim_ascii())
        .filter(|item| !item.is_empty())
}

fn has_token(value: &[u8], token: &str) -> bool {
    list_items(value).any(|item| item.eq_ignore_ascii_case(token.as_bytes()))
}

/// What a valid upgrade request asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpgradeRequest {
    /// The `Sec-WebSocket-Accept` value to answer with.
    pub accept: String,
    /// Subprotocols offered, in the client's order of preference.
    pub protocols: Vec<String>,
    /// Extensions offered, in order (several offers of one extension are fallbacks).
    pub extensions: Vec<Extension>,
    pub origin: Option<String>,
    pub host: Option<String>,
}

fn header_text<'a>(value: &'a [u8], name: &'static str) -> Result<&'a str, HandshakeError> {
    std::str::from_utf8(value).map_err(|_| HandshakeError::InvalidHeader(name))
}

/// What a client's handshake headers offer, before the rules of its HTTP version.
struct Offered<'a> {
    upgrade: bool,
    connection: bool,
    version: Option<&'a [u8]>,
    key: Option<&'a [u8]>,
    protocols: Vec<String>,
    extensions_text: String,
    origin: Option<String>,
    host: Option<String>,
}

impl Offered<'_> {
    /// The extensions offered, read once the request is otherwise valid.
    fn extensions(&self) -> Result<Vec<Extension>, HandshakeError> {
        if self.extensions_text.trim().is_empty() {
            Ok(Vec::new())
        } else {
            parse_extensions(&self.extensions_text)
        }
    }
}

/// Reads the handshake headers. Headers may repeat; list headers are combined as RFC
/// 9110 says.
fn offered<'a>(
    headers: impl IntoIterator<Item = (&'a str, &'a [u8])>,
) -> Result<Offered<'a>, HandshakeError> {
    let mut offered = Offered {
        upgrade: false,
        connection: false,
        version: None,
        key: None,
        protocols: Vec::new(),
        extensions_text: String::new(),
        origin: None,
        host: None,
    };
    let extensions_text = &mut offered.extensions_text;
    for (name, value) in headers {
        if name.eq_ignore_ascii_case("upgrade") {
            offered.upgrade |= has_token(value, "websocket");
        } else if name.eq_ignore_ascii_case("connection") {
            offered.connection |= has_token(value, "upgrade");
        } else if name.eq_ignore_ascii_case("sec-websocket-version") {
            offered.version = Some(value);
        } else if name.eq_ignore_ascii_case("sec-websocket-key") {
            if offered.key.is_some() {
                return Err(HandshakeError::InvalidKey);
            }
            offered.key = Some(value);
        } else if name.eq_ignore_ascii_case("sec-websocket-protocol") {
            for item in list_items(value) {
                offered
                    .protocols
                    .push(header_text(item, "Sec-WebSocket-Protocol")?.to_owned());
            }
        } else if name.eq_ignore_ascii_case("sec-websocket-extensions") {
            if !extensions_text.is_empty() {
                extensions_text.push(',');
            }
            extensions_text.push_str(header_text(value, "Sec-WebSocket-Extensions")?);
        } else if name.eq_ignore_ascii_case("origin") {
            offered.origin = Some(header_text(value, "Origin")?.to_owned());
        } else if name.eq_ignore_ascii_case("host") {
            offered.host = Some(header_text(value, "Host")?.to_owned());
        }
    }
    Ok(offered)
}

/// Validates a client's upgrade request. `http_11_or_later` is false for HTTP/1.0.
/// Headers may repeat; list headers are combined as RFC 9110 says.
pub fn validate_request<'a>(
    method: &str,
    http_11_or_later: bool,
    headers: impl IntoIterator<Item = (&'a str, &'a [u8])>,
) -> Result<UpgradeRequest, HandshakeError> {
    let offered = offered(headers)?;
    if !method.eq_ignore_ascii_case("GET") {
        return Err(HandshakeError::MethodNotAllowed);
    }
    if !offered.upgrade {
        return Err(HandshakeError::NotAnUpgrade);
    }
    if !http_11_or_later {
        return Err(HandshakeError::HttpVersion);
    }
    if !offered.connection {
        return Err(HandshakeError::ConnectionNotUpgrade);
    }
    if offered.version.map(<[u8]>::trim_ascii) != Some(b"13") {
        return Err(HandshakeError::UnsupportedVersion);
    }
    let key = offered.key.ok_or(HandshakeError::MissingKey)?.trim_ascii();
    match BASE64.decode(key) {
        Ok(raw) if raw.len() == 16 => {}
        _ => return Err(HandshakeError::InvalidKey),
    }
    Ok(UpgradeRequest {
        accept: accept_key(key),
        extensions: offered.extensions()?,
        protocols: offered.protocols,
        origin: offered.origin,
        host: offered.host,
    })
}

/// Validates a WebSocket opened over HTTP/2 (RFC 8441): an extended CONNECT whose
/// `:protocol` is `websocket` (the caller has checked both). It carries
/// `Sec-WebSocket-Version: 13` and no key: its answer is a 200, with no accept value
/// (`accept` is empty).
pub fn validate_extended_connect<'a>(
    headers: impl IntoIterator<Item = (&'a str, &'a [u8])>,
) -> Result<UpgradeRequest, HandshakeError> {
    let offered = offered(headers)?;
    if offered.version.map(<[u8]>::trim_ascii) != Some(b"13") {
        return Err(HandshakeError::UnsupportedVersion);
    }
    Ok(UpgradeRequest {
        accept: String::new(),
        extensions: offered.extensions()?,
        protocols: offered.protocols,
        origin: offered.origin,
        host: offered.host,
    })
}

/// The `101 Switching Protocols` answer, as bytes to write.
pub fn response_bytes(accept: &str, protocol: Option<&str>, extensions: Option<&str>) -> Vec<u8> {
    let mut out = Vec::with_capacity(160);
    out.extend_from_slice(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ",
    );
    out.extend_from_slice(accept.as_bytes());
    out.extend_from_slice(b"\r\n");
    if let Some(protocol) = protocol {
        out.extend_from_slice(b"Sec-WebSocket-Protocol: ");
        out.extend_from_slice(protocol.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if let Some(extensions) = extensions {
        out.extend_from_slice(b"Sec-WebSocket-Extensions: ");
        out.extend_from_slice(extensions.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// A raw HTTP request head, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    pub method: String,
    pub target: String,
    pub http_11_or_later: bool,
    pub headers: Vec<(String, Vec<u8>)>,
}

impl RequestHead {
    pub fn headers(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.headers.iter().map(|(n, v)| (n.as_str(), v.as_slice()))
    }

    /// Validates this head as a WebSocket upgrade.
    pub fn validate(&self) -> Result<UpgradeRequest, HandshakeError> {
        validate_request(&self.method, self.http_11_or_later, self.headers())
    }
}

/// Parses a request head from the start of `buf`: `Ok(None)` until the blank line has
/// arrived, then the head and its length. Fails once `max_len` bytes hold no full head.
pub fn parse_request(
    buf: &[u8],
    max_len: usize,
) -> Result<Option<(RequestHead, usize)>, HandshakeError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    let status = request.parse(buf);
    parsed_head(status, buf.len(), max_len, || RequestHead {
        method: request.method.unwrap_or_default().to_owned(),
        target: request.path.unwrap_or_default().to_owned(),
        http_11_or_later: request.version.unwrap_or(0) >= 1,
        headers: owned_headers(request.headers),
    })
}

/// Headers copied out of httparse's borrowed slice.
fn owned_headers(headers: &[httparse::Header<'_>]) -> Vec<(String, Vec<u8>)> {
    headers
        .iter()
        .map(|h| (h.name.to_owned(), h.value.to_vec()))
        .collect()
}

/// What an httparse result means for a head: complete (built by `head`), incomplete, or
/// an error; a head that does not fit in `max_len` bytes is too large.
fn parsed_head<T>(
    status: httparse::Result<usize>,
    buffered: usize,
    max_len: usize,
    head: impl FnOnce() -> T,
) -> Result<Option<(T, usize)>, HandshakeError> {
    match status {
        Ok(httparse::Status::Complete(len)) if len <= max_len => Ok(Some((head(), len))),
        Ok(_) if buffered >= max_len => Err(HandshakeError::TooLarge),
        Ok(_) => Ok(None),
        Err(httparse::Error::TooManyHeaders) => Err(HandshakeError::TooLarge),
        Err(e) => Err(HandshakeError::Malformed(e.to_string())),
    }
}

/// A client's upgrade request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientRequest {
    /// `host[:port]` for the Host header.
    pub host: String,
    /// Path and query.
    pub target: String,
    pub key: String,
    pub protocols: Vec<String>,
    /// The `Sec-WebSocket-Extensions` offer, if any.
    pub extensions: Option<String>,
    pub origin: Option<String>,
    /// Further headers (for example `Authorization`).
    pub headers: Vec<(String, String)>,
}

impl ClientRequest {
    pub fn new(host: impl Into<String>, target: impl Into<String>, key: String) -> Self {
        Self {
            host: host.into(),
            target: target.into(),
            key,
            protocols: Vec::new(),
            extensions: None,
            origin: None,
            headers: Vec::new(),
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {}\r\nSec-WebSocket-Version: 13\r\n",
            self.target, self.host, self.key
        );
        if !self.protocols.is_empty() {
            out.push_str(&format!(
                "Sec-WebSocket-Protocol: {}\r\n",
                self.protocols.join(", ")
            ));
        }
        if let Some(extensions) = &self.extensions {
            out.push_str(&format!("Sec-WebSocket-Extensions: {extensions}\r\n"));
        }
        if let Some(origin) = &self.origin {
            out.push_str(&format!("Origin: {origin}\r\n"));
        }
        for (name, value) in &self.headers {
            out.push_str(&format!("{name}: {value}\r\n"));
        }
        out.push_str("\r\n");
        out.into_bytes()
    }
}

/// A raw HTTP response head, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseHead {
    pub status: u16,
    pub reason: String,
    pub headers: Vec<(String, Vec<u8>)>,
}

impl ResponseHead {
    fn header(&self, name: &str) -> impl Iterator<Item = &[u8]> {
        let name = name.to_owned();
        self.headers
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(&name))
            .map(|(_, v)| v.as_slice())
    }
}

/// Parses a response head from the start of `buf`, like [`parse_request`].
pub fn parse_response(
    buf: &[u8],
    max_len: usize,
) -> Result<Option<(ResponseHead, usize)>, HandshakeError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut headers);
    let status = response.parse(buf);
    parsed_head(status, buf.len(), max_len, || ResponseHead {
        status: response.code.unwrap_or_default(),
        reason: response.reason.unwrap_or_default().to_owned(),
        headers: owned_headers(response.headers),
    })
}

/// What the server agreed to.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Accepted {
    pub protocol: Option<String>,
    pub extensions: Vec<Extension>,
}

/// Checks the server's answer against the request that was sent. `offered_extensions`
/// names the extensions the request offered; any other in the answer fails.
pub fn validate_response(
    response: &ResponseHead,
    request: &ClientRequest,
    offered_extensions: &[&str],
) -> Result<Accepted, HandshakeError> {
    if response.status != 101 {
        return Err(HandshakeError::UnexpectedStatus {
            status: response.status,
            reason: response.reason.clone(),
        });
    }
    if !response
        .header("upgrade")
        .any(|v| has_token(v, "websocket"))
    {
        return Err(HandshakeError::InvalidHeader("Upgrade"));
    }
    if !response
        .header("connection")
        .any(|v| has_token(v, "upgrade"))
    {
        return Err(HandshakeError::ConnectionNotUpgrade);
    }
    let expected = accept_key(request.key.as_bytes());
    let mut accepts = response.header("sec-websocket-accept");
    match (accepts.next(), accepts.next()) {
        (Some(value), None) if value.trim_ascii() == expected.as_bytes() => {}
        _ => return Err(HandshakeError::AcceptMismatch),
    }
    let mut protocol = None;
    for value in response.header("sec-websocket-protocol") {
        let chosen = std::str::from_utf8(value)
            .map_err(|_| HandshakeError::InvalidHeader("Sec-WebSocket-Protocol"))?
            .trim()
            .to_owned();
        if protocol.is_some() || !request.protocols.contains(&chosen) {
            return Err(HandshakeError::UnofferedProtocol(chosen));
        }
        protocol = Some(chosen);
    }
    let mut extensions = Vec::new();
    for value in response.header("sec-websocket-extensions") {
        let value = std::str::from_utf8(value)
            .map_err(|_| HandshakeError::InvalidHeader("Sec-WebSocket-Extensions"))?;
        for extension in parse_extensions(value)? {
            if !offered_extensions
                .iter()
                .any(|o| o.eq_ignore_ascii_case(&extension.name))
            {
                return Err(HandshakeError::UnofferedExtension(extension.name));
            }
            extensions.push(extension);
        }
    }
    Ok(Accepted {
        protocol,
        extensions,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

    fn request(lines: &[(&str, &str)]) -> Result<UpgradeRequest, HandshakeError> {
        validate_request("GET", true, lines.iter().map(|(n, v)| (*n, v.as_bytes())))
    }

    fn good() -> Vec<(&'static str, &'static str)> {
        vec![
            ("Host", "example.com"),
            ("Upgrade", "websocket"),
            ("Connection", "keep-alive, Upgrade"),
            ("Sec-WebSocket-Key", KEY),
            ("Sec-WebSocket-Version", "13"),
            ("Origin", "http://example.com"),
        ]
    }

    #[test]
    fn rfc_sample_accept_key() {
        assert_eq!(accept_key(KEY.as_bytes()), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    #[test]
    fn accepts_a_good_request() {
        let mut lines = good();
        lines.push(("Sec-WebSocket-Protocol", "chat, superchat"));
        lines.push((
            "sec-websocket-extensions",
            "permessage-deflate; client_max_window_bits",
        ));
        lines.push(("Sec-WebSocket-Extensions", "x-other; a=\"1\""));
        let req = request(&lines).unwrap();
        assert_eq!(req.accept, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
        assert_eq!(req.protocols, ["chat", "superchat"]);
        assert_eq!(req.origin.as_deref(), Some("http://example.com"));
        assert_eq!(req.extensions.len(), 2);
        assert_eq!(
            req.extensions[0].params,
            [("client_max_window_bits".to_owned(), None)]
        );
        assert_eq!(
            req.extensions[1].params,
            [("a".to_owned(), Some("1".to_owned()))]
        );
    }

    #[test]
    fn each_missing_piece_has_its_status() {
        let without = |name: &str| -> Vec<(&'static str, &'static str)> {
            good().into_iter().filter(|(n, _)| *n != name).collect()
        };
        assert_eq!(request(&without("Upgrade")).unwrap_err().status(), 426);
        assert_eq!(
            request(&without("Connection")).unwrap_err(),
            HandshakeError::ConnectionNotUpgrade
        );
        assert_eq!(
            request(&without("Sec-WebSocket-Key")).unwrap_err(),
            HandshakeError::MissingKey
        );
        let version = request(&without("Sec-WebSocket-Version")).unwrap_err();
        assert_eq!(version.status(), 426);
        assert_eq!(
            version.response_headers(),
            [("Sec-WebSocket-Version", "13")]
        );

        let mut lines = without("Sec-WebSocket-Version");
        lines.push(("Sec-WebSocket-Version", "8"));
        assert_eq!(
            request(&lines).unwrap_err(),
            HandshakeError::UnsupportedVersion
        );
        let mut lines = without("Sec-WebSocket-Key");
        lines.push(("Sec-WebSocket-Key", "c2hvcnQ="));
        assert_eq!(request(&lines).unwrap_err(), HandshakeError::InvalidKey);

        let post = validate_request("POST", true, good().iter().map(|(n, v)| (*n, v.as_bytes())));
        assert_eq!(post.unwrap_err().status(), 405);
        let old = validate_request("GET", false, good().iter().map(|(n, v)| (*n, v.as_bytes())));
        assert_eq!(old.unwrap_err(), HandshakeError::HttpVersion);
    }

    #[test]
    fn extension_grammar() {
        let parsed = parse_extensions("permessage-deflate; server_no_context_takeover; client_max_window_bits=10, permessage-deflate").unwrap();
        assert_eq!(parsed.len(), 2);
        assert_eq!(
            parsed[0].params[1],
            ("client_max_window_bits".to_owned(), Some("10".to_owned()))
        );
        assert!(parsed[1].params.is_empty());
        for bad in [
            "",
            "a;",
            "a; =1",
            "a b",
            "a; b=\"unterminated",
            "a; b=\"\"",
            "a; b=\"x y\"",
            ";a",
        ] {
            assert!(parse_extensions(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn raw_request_and_response_roundtrip() {
        let client = ClientRequest::new("localhost:8080", "/echo?x=1", KEY.to_owned());
        let bytes = client.to_bytes();
        for cut in 0..bytes.len() {
            assert_eq!(parse_request(&bytes[..cut], 8192), Ok(None));
        }
        let (head, len) = parse_request(&bytes, 8192).unwrap().unwrap();
        assert_eq!(len, bytes.len());
        assert_eq!(head.target, "/echo?x=1");
        let upgrade = head.validate().unwrap();

        let response = response_bytes(&upgrade.accept, None, None);
        let (head, _) = parse_response(&response, 8192).unwrap().unwrap();
        assert_eq!(
            validate_response(&head, &client, &[]),
            Ok(Accepted::default())
        );

        let forged = response_bytes("AAAAAAAAAAAAAAAAAAAAAAAAAAA=", None, None);
        let (head, _) = parse_response(&forged, 8192).unwrap().unwrap();
        assert_eq!(
            validate_response(&head, &client, &[]),
            Err(HandshakeError::AcceptMismatch)
        );

        let extra = response_bytes(&upgrade.accept, Some("chat"), Some("permessage-deflate"));
        let (head, _) = parse_response(&extra, 8192).unwrap().unwrap();
        assert_eq!(
            validate_response(&head, &client, &[]),
            Err(HandshakeError::UnofferedProtocol("chat".into()))
        );
    }

    #[test]
    fn oversized_heads_are_refused() {
        let mut big = b"GET / HTTP/1.1\r\nX: ".to_vec();
        big.extend(std::iter::repeat_n(b'a', 10_000));
        assert_eq!(parse_request(&big, 8192), Err(HandshakeError::TooLarge));
        assert!(matches!(
            parse_request(b"\x00\x01garbage\r\n\r\n", 8192),
            Err(HandshakeError::Malformed(_))
        ));
    }

    #[test]
    fn an_extended_connect_needs_version_13_and_no_key() {
        let headers = [
            ("sec-websocket-version", &b"13"[..]),
            (
                "sec-websocket-extensions",
                b"permessage-deflate; client_max_window_bits",
            ),
            ("sec-websocket-protocol", b"centrifuge-protobuf"),
            ("origin", b"https://example.com"),
        ];
        let upgrade = validate_extended_connect(headers).unwrap();
        assert_eq!(upgrade.accept, "");
        assert_eq!(upgrade.protocols, ["centrifuge-protobuf"]);
        assert_eq!(upgrade.extensions.len(), 1);
        assert_eq!(upgrade.origin.as_deref(), Some("https://example.com"));
        assert!(matches!(
            validate_extended_connect([("sec-websocket-version", &b"8"[..])]),
            Err(HandshakeError::UnsupportedVersion)
        ));
        assert!(matches!(
            validate_extended_connect([]),
            Err(HandshakeError::UnsupportedVersion)
        ));
        assert!(matches!(
            validate_extended_connect([
                ("sec-websocket-version", &b"13"[..]),
                ("sec-websocket-extensions", b"permessage-deflate; =")
            ]),
            Err(HandshakeError::InvalidHeader(_) | HandshakeError::Malformed(_))
        ));
    }
}
