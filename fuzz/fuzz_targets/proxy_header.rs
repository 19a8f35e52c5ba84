//! Who a client is behind a proxy (crates/protocol/src/proxy.rs): PROXY protocol headers,
//! `Forwarded`/`X-Forwarded-For` headers and trusted ranges.
//!
//! Input: the first bytes of a connection; the same bytes, as lossy UTF-8, as header
//! values and ranges.
//!
//! 1. Reading a header never panics; an accepted one takes no more bytes than it was
//!    given, written again as version 1 (when its addresses are of one family) reads
//!    back the same, and whatever follows it does not change it; `Absent` agrees with
//!    `starts_proxy_header`; `Incomplete` asks for more than it was given.
//! 2. The client named behind a trusted proxy is the peer or an address the headers
//!    hold; from an untrusted peer it is always the peer.
//! 3. A range that parses contains its own network address.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use libfuzzer_sys::fuzz_target;
use switchboard_protocol::proxy::{
    forwarded_client, parse_proxy_header, starts_proxy_header, Cidr, ForwardingHeader, ProxyError,
    ProxyHeader,
};

fn v1(source: SocketAddr, destination: SocketAddr) -> Option<String> {
    let family = match (source, destination) {
        (SocketAddr::V4(_), SocketAddr::V4(_)) => "TCP4",
        (SocketAddr::V6(_), SocketAddr::V6(_)) => "TCP6",
        _ => return None,
    };
    Some(format!(
        "PROXY {family} {} {} {} {}\r\n",
        source.ip(),
        destination.ip(),
        source.port(),
        destination.port()
    ))
}

fn check_header(bytes: &[u8]) {
    match parse_proxy_header(bytes) {
        Ok((header, taken)) => {
            assert!(taken <= bytes.len());
            let mut longer = bytes[..taken].to_vec();
            longer.extend_from_slice(b"GET / HTTP/1.1\r\n");
            assert_eq!(parse_proxy_header(&longer), Ok((header, taken)));
            if let ProxyHeader::Proxied {
                source,
                destination,
            } = header
            {
                if let Some(text) = v1(source, destination) {
                    let again = parse_proxy_header(text.as_bytes());
                    assert_eq!(again, Ok((header, text.len())), "{text}");
                }
            }
        }
        Err(ProxyError::Absent) => assert!(!starts_proxy_header(bytes)),
        Err(ProxyError::Incomplete(needed)) => {
            assert!(starts_proxy_header(bytes));
            assert!(needed > bytes.len(), "{needed} for {}", bytes.len());
        }
        Err(ProxyError::Malformed(_)) => assert!(starts_proxy_header(bytes)),
    }
}

fn check_forwarded(text: &str) {
    let mut ranges: Vec<Cidr> = Vec::new();
    for part in text.split(' ') {
        let Ok(range) = part.parse::<Cidr>() else {
            continue;
        };
        let address: IpAddr = part.trim().split('/').next().unwrap().parse().expect("parsed once");
        assert!(range.contains(address), "{part}");
        ranges.push(range);
    }
    let peer = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let lines: Vec<&str> = text.split('\n').collect();
    let everyone = |_: IpAddr| true;
    let header = if text.len() % 2 == 0 {
        ForwardingHeader::XForwardedFor
    } else {
        ForwardingHeader::Forwarded
    };
    let client = forwarded_client(peer, header, lines.iter().copied(), everyone);
    // Every address the text spells, in any of the forms proxies write.
    let spelled: Vec<IpAddr> = text
        .split(|c: char| !(c.is_ascii_hexdigit() || c == ':' || c == '.'))
        .filter_map(|token| {
            token
                .parse::<IpAddr>()
                .or_else(|_| token.parse::<SocketAddr>().map(|s| s.ip()))
                .ok()
        })
        .map(|ip| ip.to_canonical())
        .collect();
    assert!(
        client == peer || spelled.contains(&client.to_canonical()),
        "{client} from {text:?}"
    );
    let nobody = |_: IpAddr| false;
    assert_eq!(
        forwarded_client(peer, header, lines.iter().copied(), nobody),
        peer
    );
    let some = |ip: IpAddr| ranges.iter().any(|r| r.contains(ip)) || ip == peer;
    let _ = forwarded_client(peer, header, lines.iter().copied(), some);
}

fuzz_target!(|data: &[u8]| {
    check_header(data);
    check_forwarded(&String::from_utf8_lossy(data));
});
