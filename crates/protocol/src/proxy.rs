//! Who the client is behind a proxy: the PROXY protocol header (version 1, text, and
//! version 2, binary, as HAProxy's specification gives them) that a load balancer puts
//! before a connection's first byte, the `Forwarded` (RFC 7239) and `X-Forwarded-For`
//! headers a reverse proxy adds to a request, and the address ranges a server trusts to
//! say so.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The version 2 header's first twelve bytes.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// A version 1 header's longest form, `\r\n` included.
pub const V1_MAX: usize = 107;

/// What a PROXY header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyHeader {
    /// The connection is relayed for a client at `source`, which reached `destination`.
    Proxied {
        source: SocketAddr,
        destination: SocketAddr,
    },
    /// The proxy speaks for itself (a health check: version 2's `LOCAL`), or does not
    /// know or say the client's address (`UNKNOWN`, a Unix socket, an unspecified
    /// family): the connection's own peer is the client.
    Unknown,
}

/// Why the bytes at the start of a connection are not a PROXY header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    /// They start as no PROXY header does.
    #[error("the connection does not start with a PROXY protocol header")]
    Absent,
    /// They may be the start of one: more bytes are needed (at least this many in all).
    #[error("the PROXY protocol header is incomplete")]
    Incomplete(usize),
    #[error("malformed PROXY protocol header: {0}")]
    Malformed(&'static str),
}

/// Whether `bytes` begin (or, being short, may begin) a PROXY header of either version.
pub fn starts_proxy_header(bytes: &[u8]) -> bool {
    let v1 = b"PROXY ";
    let prefix = |whole: &[u8]| {
        let n = bytes.len().min(whole.len());
        n > 0 && bytes[..n] == whole[..n]
    };
    prefix(v1) || prefix(&V2_SIGNATURE)
}

/// Reads the PROXY header at the start of `bytes`: what it says and how many bytes it
/// takes (the connection's own data follows them).
pub fn parse_proxy_header(bytes: &[u8]) -> Result<(ProxyHeader, usize), ProxyError> {
    if !starts_proxy_header(bytes) {
        return Err(ProxyError::Absent);
    }
    if bytes.first() == Some(&b'P') {
        parse_v1(bytes)
    } else {
        parse_v2(bytes)
    }
}

fn parse_v1(bytes: &[u8]) -> Result<(ProxyHeader, usize), ProxyError> {
    let window = &bytes[..bytes.len().min(V1_MAX)];
    let Some(end) = window.windows(2).position(|w| w == b"\r\n") else {
        return if bytes.len() >= V1_MAX {
            Err(ProxyError::Malformed(
                "a version 1 header longer than 107 bytes",
            ))
        } else {
            Err(ProxyError::Incomplete(bytes.len() + 1))
        };
    };
    let line = std::str::from_utf8(&bytes[..end])
        .map_err(|_| ProxyError::Malformed("a version 1 header that is not text"))?;
    let fields: Vec<&str> = line.split(' ').collect();
    let taken = end + 2;
    match fields.get(1).copied() {
        Some("UNKNOWN") => Ok((ProxyHeader::Unknown, taken)),
        Some(family @ ("TCP4" | "TCP6")) => {
            let [_, _, source, destination, source_port, destination_port] = fields[..] else {
                return Err(ProxyError::Malformed("a version 1 header needs six fields"));
            };
            let ip = |text: &str| -> Result<IpAddr, ProxyError> {
                let ip = match family {
                    "TCP4" => text.parse::<Ipv4Addr>().map(IpAddr::V4),
                    _ => text.parse::<Ipv6Addr>().map(IpAddr::V6),
                };
                ip.map_err(|_| ProxyError::Malformed("an address that is not of its family"))
            };
            let port = |text: &str| -> Result<u16, ProxyError> {
                // Decimal, no sign, no leading zero (the specification's form).
                let plain = !text.is_empty()
                    && text.bytes().all(|b| b.is_ascii_digit())
                    && (text == "0" || !text.starts_with('0'));
                plain
                    .then(|| text.parse().ok())
                    .flatten()
                    .ok_or(ProxyError::Malformed("a port that is not 0-65535"))
            };
            Ok((
                ProxyHeader::Proxied {
                    source: SocketAddr::new(ip(source)?, port(source_port)?),
                    destination: SocketAddr::new(ip(destination)?, port(destination_port)?),
                },
                taken,
            ))
        }
        _ => Err(ProxyError::Malformed(
            "a version 1 family other than TCP4, TCP6 or UNKNOWN",
        )),
    }
}

fn parse_v2(bytes: &[u8]) -> Result<(ProxyHeader, usize), ProxyError> {
    if bytes.len() < 16 {
        return Err(ProxyError::Incomplete(16));
    }
    let version_command = bytes[12];
    if version_command >> 4 != 2 {
        return Err(ProxyError::Malformed(
            "a version 2 header of another version",
        ));
    }
    let length = usize::from(u16::from_be_bytes([bytes[14], bytes[15]]));
    let taken = 16 + length;
    if bytes.len() < taken {
        return Err(ProxyError::Incomplete(taken));
    }
    let addresses = &bytes[16..taken];
    match version_command & 0x0f {
        // LOCAL: the proxy's own connection; the address block is ignored.
        0 => return Ok((ProxyHeader::Unknown, taken)),
        1 => {}
        _ => {
            return Err(ProxyError::Malformed(
                "a version 2 command other than LOCAL or PROXY",
            ))
        }
    }
    let family = bytes[13];
    let short = ProxyError::Malformed("a version 2 address block shorter than its family's");
    let header = match family {
        // TCP and UDP over IPv4.
        0x11 | 0x12 => {
            let a: &[u8; 12] = addresses.get(..12).ok_or(short)?.try_into().expect("12");
            let ip = |i: usize| IpAddr::V4(Ipv4Addr::new(a[i], a[i + 1], a[i + 2], a[i + 3]));
            let port = |i: usize| u16::from_be_bytes([a[i], a[i + 1]]);
            ProxyHeader::Proxied {
                source: SocketAddr::new(ip(0), port(8)),
                destination: SocketAddr::new(ip(4), port(10)),
            }
        }
        // TCP and UDP over IPv6.
        0x21 | 0x22 => {
            let a: &[u8; 36] = addresses.get(..36).ok_or(short)?.try_into().expect("36");
            let ip = |i: usize| {
                let octets: [u8; 16] = a[i..i + 16].try_into().expect("16");
                IpAddr::V6(Ipv6Addr::from(octets))
            };
            let port = |i: usize| u16::from_be_bytes([a[i], a[i + 1]]);
            ProxyHeader::Proxied {
                source: SocketAddr::new(ip(0), port(32)),
                destination: SocketAddr::new(ip(16), port(34)),
            }
        }
        // Unspecified, or Unix sockets: no address the server can use.
        0x00 | 0x31 | 0x32 => ProxyHeader::Unknown,
        _ => {
            return Err(ProxyError::Malformed(
                "a version 2 address family that does not exist",
            ))
        }
    };
    Ok((header, taken))
}

/// An address range: `10.0.0.0/8`, `fd00::/8`, or one address (`127.0.0.1`, `::1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl std::str::FromStr for Cidr {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let (address, prefix) = match text.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (text, None),
        };
        let network: IpAddr = address
            .parse()
            .map_err(|_| format!("{text:?} is not an address or a CIDR range"))?;
        let network = network.to_canonical();
        let bits = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => bits,
            Some(prefix) => prefix
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= bits)
                .ok_or_else(|| format!("{text:?}: the prefix length must be 0-{bits}"))?,
        };
        Ok(Self { network, prefix })
    }
}

impl Cidr {
    /// Whether `ip` is in the range (an IPv4-mapped IPv6 address as its IPv4 address).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let mask = |bits: u32, width: u32| -> u128 {
            if bits == 0 {
                0
            } else {
                (!0u128 << (width - bits)) & (!0u128 >> (128 - width))
            }
        };
        match (self.network, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let m = mask(u32::from(self.prefix), 32);
                u128::from(u32::from(net)) & m == u128::from(u32::from(ip)) & m
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let m = mask(u32::from(self.prefix), 128);
                u128::from(net) & m == u128::from(ip) & m
            }
            _ => false,
        }
    }
}

/// Which header a trusted proxy writes the client into. Only that one is read: a proxy
/// passes the other on as the client sent it, so reading both would let a client name
/// itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForwardingHeader {
    /// `X-Forwarded-For: client, proxy1, ...` (nginx, HAProxy, most load balancers).
    XForwardedFor,
    /// `Forwarded: for=client, for=proxy1` (RFC 7239).
    Forwarded,
}

impl ForwardingHeader {
    /// The header's name, in lower case.
    pub fn name(self) -> &'static str {
        match self {
            Self::XForwardedFor => "x-forwarded-for",
            Self::Forwarded => "forwarded",
        }
    }
}

/// The client a request came from, when `peer` (the connection's address) is a proxy
/// that `trusted` says may tell: walking the hops the request's `header` lines name
/// from the nearest, the first address that is not a trusted proxy. A hop that names
/// no address (`unknown`, an obfuscated name, something malformed) ends the walk at the
/// hop before it, so a client cannot hide behind garbage; every hop trusted means the
/// farthest is the client. `peer` itself when it is not trusted.
pub fn forwarded_client<'a>(
    peer: IpAddr,
    header: ForwardingHeader,
    lines: impl IntoIterator<Item = &'a str>,
    trusted: impl Fn(IpAddr) -> bool,
) -> IpAddr {
    if !trusted(peer) {
        return peer;
    }
    let hops: Vec<Option<IpAddr>> = lines
        .into_iter()
        .flat_map(|line| line.split(','))
        .map(|hop| match header {
            ForwardingHeader::Forwarded => forwarded_for(hop),
            ForwardingHeader::XForwardedFor => node_address(hop),
        })
        .collect();
    let mut client = peer;
    for hop in hops.iter().rev() {
        let Some(hop) = *hop else {
            return client;
        };
        client = hop.to_canonical();
        if !trusted(client) {
            return client;
        }
    }
    client
}

/// The `for=` address of one `Forwarded` element.
fn forwarded_for(element: &str) -> Option<IpAddr> {
    element.split(';').find_map(|pair| {
        let (name, value) = pair.split_once('=')?;
        name.trim()
            .eq_ignore_ascii_case("for")
            .then(|| node_address(value))
            .flatten()
    })
}

/// An address as proxies write it: `192.0.2.1`, `192.0.2.1:4711`, `2001:db8::1`,
/// `[2001:db8::1]:4711`, quoted or not.
fn node_address(text: &str) -> Option<IpAddr> {
    let text = text.trim();
    let text = text
        .strip_prefix('"')
        .and_then(|t| t.strip_suffix('"'))
        .unwrap_or(text);
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Some(rest) = text.strip_prefix('[') {
        let (ip, _) = rest.split_once(']')?;
        return ip.parse::<Ipv6Addr>().ok().map(IpAddr::V6);
    }
    text.parse::<SocketAddr>().ok().map(|s| s.ip())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    #[test]
    fn version_1_headers_are_read_with_their_length() {
        let header = b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\nGET / HTTP/1.1\r\n";
        assert_eq!(
            parse_proxy_header(header),
            Ok((
                ProxyHeader::Proxied {
                    source: addr("192.0.2.1:56324"),
                    destination: addr("198.51.100.2:443")
                },
                45
            ))
        );
        let six = b"PROXY TCP6 2001:db8::1 ::1 1 65535\r\n";
        let (header, taken) = parse_proxy_header(six).unwrap();
        assert_eq!(taken, six.len());
        assert_eq!(
            header,
            ProxyHeader::Proxied {
                source: addr("[2001:db8::1]:1"),
                destination: addr("[::1]:65535")
            }
        );
        assert_eq!(
            parse_proxy_header(b"PROXY UNKNOWN\r\n"),
            Ok((ProxyHeader::Unknown, 15))
        );
    }

    #[test]
    fn version_1_refusals() {
        assert_eq!(
            parse_proxy_header(b"GET / HTTP/1.1"),
            Err(ProxyError::Absent)
        );
        assert!(matches!(
            parse_proxy_header(b"PROXY TCP4 1.2.3.4"),
            Err(ProxyError::Incomplete(_))
        ));
        assert!(matches!(
            parse_proxy_header(b"PRO"),
            Err(ProxyError::Incomplete(_))
        ));
        let long = [b"PROXY ".as_slice(), &[b'1'; 200]].concat();
        assert!(matches!(
            parse_proxy_header(&long),
            Err(ProxyError::Malformed(_))
        ));
        for bad in [
            "PROXY TCP4 1.2.3.4 5.6.7.8 1 99999\r\n",
            "PROXY TCP4 ::1 5.6.7.8 1 2\r\n",
            "PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",
            "PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",
            "PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n",
        ] {
            assert!(
                matches!(
                    parse_proxy_header(bad.as_bytes()),
                    Err(ProxyError::Malformed(_))
                ),
                "{bad}"
            );
        }
    }

    fn v2(command: u8, family: u8, block: &[u8]) -> Vec<u8> {
        let mut bytes = V2_SIGNATURE.to_vec();
        bytes.push(0x20 | command);
        bytes.push(family);
        bytes.extend_from_slice(&(block.len() as u16).to_be_bytes());
        bytes.extend_from_slice(block);
        bytes
    }

    #[test]
    fn version_2_headers_are_read_with_their_length() {
        let block = [192, 0, 2, 1, 198, 51, 100, 2, 0xdc, 0x04, 0x01, 0xbb];
        let mut bytes = v2(1, 0x11, &block);
        bytes.extend_from_slice(b"GET /");
        assert_eq!(
            parse_proxy_header(&bytes),
            Ok((
                ProxyHeader::Proxied {
                    source: addr("192.0.2.1:56324"),
                    destination: addr("198.51.100.2:443")
                },
                28
            ))
        );
        // With a TLV after the addresses, still one header.
        let mut with_tlv = block.to_vec();
        with_tlv.extend_from_slice(&[0x04, 0, 1, 0]);
        assert_eq!(parse_proxy_header(&v2(1, 0x11, &with_tlv)).unwrap().1, 32);
        let mut six = [0u8; 36];
        six[15] = 1;
        six[31] = 2;
        six[32..34].copy_from_slice(&8080u16.to_be_bytes());
        assert_eq!(
            parse_proxy_header(&v2(1, 0x21, &six)).unwrap().0,
            ProxyHeader::Proxied {
                source: addr("[::1]:8080"),
                destination: addr("[::2]:0")
            }
        );
        assert_eq!(
            parse_proxy_header(&v2(0, 0x11, &block)).unwrap().0,
            ProxyHeader::Unknown
        );
    }

    #[test]
    fn version_2_refusals() {
        let block = [1u8; 12];
        assert!(matches!(
            parse_proxy_header(&v2(1, 0x11, &block)[..20]),
            Err(ProxyError::Incomplete(28))
        ));
        assert!(matches!(
            parse_proxy_header(&V2_SIGNATURE[..5]),
            Err(ProxyError::Incomplete(16))
        ));
        assert!(matches!(
            parse_proxy_header(&v2(1, 0x11, &block[..6])),
            Err(ProxyError::Malformed(_))
        ));
        assert!(matches!(
            parse_proxy_header(&v2(1, 0x41, &block)),
            Err(ProxyError::Malformed(_))
        ));
        assert!(matches!(
            parse_proxy_header(&v2(2, 0x11, &block)),
            Err(ProxyError::Malformed(_))
        ));
        let mut wrong_version = v2(1, 0x11, &block);
        wrong_version[12] = 0x11;
        assert!(matches!(
            parse_proxy_header(&wrong_version),
            Err(ProxyError::Malformed(_))
        ));
    }

    #[test]
    fn ranges() {
        let range: Cidr = "10.0.0.0/8".parse().unwrap();
        assert!(range.contains("10.200.1.1".parse().unwrap()));
        assert!(range.contains("::ffff:10.0.0.1".parse().unwrap()));
        assert!(!range.contains("11.0.0.1".parse().unwrap()));
        assert!(!range.contains("::1".parse().unwrap()));
        let one: Cidr = "127.0.0.1".parse().unwrap();
        assert!(one.contains("127.0.0.1".parse().unwrap()));
        assert!(!one.contains("127.0.0.2".parse().unwrap()));
        let six: Cidr = "fd00::/8".parse().unwrap();
        assert!(six.contains("fd12::1".parse().unwrap()));
        assert!(!six.contains("fe80::1".parse().unwrap()));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("203.0.113.9".parse().unwrap()));
        for bad in ["10.0.0.0/33", "example.com", "10.0.0/8", "::/129", ""] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn the_client_is_the_nearest_hop_that_is_not_trusted() {
        let proxies: Vec<Cidr> = vec!["127.0.0.1".parse().unwrap(), "10.0.0.0/8".parse().unwrap()];
        let trusted = |ip: IpAddr| proxies.iter().any(|p| p.contains(ip));
        let ip = |text: &str| text.parse::<IpAddr>().unwrap();
        let local = ip("127.0.0.1");
        let xff = |lines: &[&str]| {
            forwarded_client(
                local,
                ForwardingHeader::XForwardedFor,
                lines.iter().copied(),
                trusted,
            )
        };
        let forwarded = |lines: &[&str]| {
            forwarded_client(
                local,
                ForwardingHeader::Forwarded,
                lines.iter().copied(),
                trusted,
            )
        };
        // A client's own header on the left is passed over: the proxy appended the truth.
        assert_eq!(xff(&["6.6.6.6, 203.0.113.7"]), ip("203.0.113.7"));
        assert_eq!(
            xff(&["6.6.6.6", "203.0.113.7, 10.1.1.1"]),
            ip("203.0.113.7")
        );
        assert_eq!(xff(&["203.0.113.7:4711"]), ip("203.0.113.7"));
        // Forwarded's quoted IPv6 form with a port is read.
        assert_eq!(
            forwarded(&["for=\"[2001:db8::17]:4711\";proto=https"]),
            ip("2001:db8::17")
        );
        assert_eq!(
            forwarded(&["for=198.51.100.1, For=10.0.0.2;by=10.0.0.3"]),
            ip("198.51.100.1")
        );
        // Nothing readable past a hop: the hop before it.
        assert_eq!(xff(&["203.0.113.7, garbage, 10.0.0.9"]), ip("10.0.0.9"));
        assert_eq!(forwarded(&["for=unknown"]), local);
        assert_eq!(xff(&[]), local);
        // Every hop trusted: the farthest.
        assert_eq!(xff(&["10.0.0.5, 10.0.0.6"]), ip("10.0.0.5"));
        // An address that is not a trusted proxy tells nothing.
        let stranger = ip("203.0.113.50");
        assert_eq!(
            forwarded_client(
                stranger,
                ForwardingHeader::XForwardedFor,
                ["1.1.1.1"],
                trusted
            ),
            stranger
        );
    }
}
