//! Where a channel's keys live, and what they are called.
//!
//! Every key of a channel carries the channel's name as its hash tag
//! (`P:{name}:seq`, the braces literal), so each script call on a channel touches one
//! hash slot and a Redis Cluster runs it on the one shard that owns the channel. With
//! several standalone Redis servers, a channel lives on the one its name ranks highest
//! by rendezvous hashing over their URLs (their order does not matter; adding one moves
//! only the channels it now ranks first for, which then start a new epoch there). The
//! cluster's own keys (nodes, heartbeats, the list of channels, the hooks index, the
//! notices) share the tag `%control`, which no channel's tag can be: `{`, `}` and `%`
//! in a name are escaped as `%7B`, `%7D` and `%25`.

use std::borrow::Cow;

use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Value};

/// The tag of the cluster's own keys.
pub(super) const CONTROL: &str = "%control";

/// A channel's name as its keys carry it.
pub(super) fn tag(channel: &str) -> Cow<'_, str> {
    if !channel.contains(['{', '}', '%']) {
        return Cow::Borrowed(channel);
    }
    let mut escaped = String::with_capacity(channel.len() + 8);
    for c in channel.chars() {
        match c {
            '{' => escaped.push_str("%7B"),
            '}' => escaped.push_str("%7D"),
            '%' => escaped.push_str("%25"),
            c => escaped.push(c),
        }
    }
    Cow::Owned(escaped)
}

/// The channel a tag names (`None` for the control tag or a tag no channel has).
pub(super) fn untag(tag: &str) -> Option<Cow<'_, str>> {
    if !tag.contains('%') {
        return Some(Cow::Borrowed(tag));
    }
    let mut name = String::with_capacity(tag.len());
    let mut rest = tag;
    while let Some(at) = rest.find('%') {
        name.push_str(&rest[..at]);
        let code = rest.get(at + 1..at + 3)?;
        name.push(match code {
            "7B" => '{',
            "7D" => '}',
            "25" => '%',
            _ => return None,
        });
        rest = &rest[at + 3..];
    }
    name.push_str(rest);
    Some(Cow::Owned(name))
}

/// `P:{tag}:kind`.
pub(super) fn key(prefix: &str, channel: &str, kind: &str) -> String {
    format!("{prefix}:{{{}}}:{kind}", tag(channel))
}

/// `P:{%control}:kind`.
pub(super) fn control_key(prefix: &str, kind: &str) -> String {
    format!("{prefix}:{{{CONTROL}}}:{kind}")
}

/// The Pub/Sub channel of posts for the node at `address` alone.
pub(super) fn inbox_of(prefix: &str, address: &str) -> String {
    control_key(prefix, &format!("to:{address}"))
}

/// The channel whose key (or Pub/Sub channel) `name` is, with its kind.
pub(super) fn channel_of<'a>(prefix: &str, name: &'a str) -> Option<(Cow<'a, str>, &'a str)> {
    let rest = name.strip_prefix(prefix)?.strip_prefix(":{")?;
    let (tag, kind) = rest.split_once("}:")?;
    if tag == CONTROL {
        return None;
    }
    Some((untag(tag)?, kind))
}

/// Which of `urls` holds `channel`: the one whose score with it is highest.
pub(super) fn rendezvous(urls: &[String], channel: &str) -> usize {
    (0..urls.len())
        .max_by_key(|&i| (score(&urls[i], channel), std::cmp::Reverse(i)))
        .unwrap_or(0)
}

/// A stable 64-bit hash of `url` and `channel` (FNV-1a, then a finaliser that spreads
/// its bits), the same on every node and every build.
fn score(url: &str, channel: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in url.bytes().chain([0xff]).chain(channel.bytes()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash ^= hash >> 30;
    hash = hash.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    hash ^= hash >> 27;
    hash = hash.wrapping_mul(0x94d0_49bb_1331_11eb);
    hash ^ (hash >> 31)
}

/// A connection to where a key lives: one standalone Redis, or the cluster (which
/// routes each command by its key's slot and follows MOVED and ASK itself).
#[derive(Clone)]
pub(super) enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(conn) => conn.req_packed_command(cmd),
            Conn::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(conn) => conn.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(conn) => conn.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(conn) => conn.get_db(),
            Conn::Cluster(conn) => conn.get_db(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_carry_the_channel_as_their_hash_tag_and_read_back() {
        assert_eq!(key("sb", "chat:lobby", "seq"), "sb:{chat:lobby}:seq");
        assert_eq!(key("sb", "a{b}%", "room"), "sb:{a%7Bb%7D%25}:room");
        for name in ["chat:lobby", "a{b}%", "%7B", "2~presence-x", ""] {
            let room = key("sb", name, "room");
            let (channel, kind) = channel_of("sb", &room).unwrap();
            assert_eq!((channel.as_ref(), kind), (name, "room"));
        }
        assert_eq!(control_key("sb", "nodes"), "sb:{%control}:nodes");
        assert!(channel_of("sb", &control_key("sb", "notices")).is_none());
        assert!(channel_of("other", &key("sb", "x", "room")).is_none());
    }

    #[test]
    fn rendezvous_ignores_order_and_moves_only_what_a_new_shard_takes() {
        let urls: Vec<String> = ["redis://a", "redis://b", "redis://c"]
            .map(String::from)
            .to_vec();
        let reversed: Vec<String> = urls.iter().rev().cloned().collect();
        let channels: Vec<String> = (0..3000).map(|i| format!("room-{i}")).collect();
        let mut counts = [0usize; 3];
        for channel in &channels {
            let here = rendezvous(&urls, channel);
            assert_eq!(urls[here], reversed[rendezvous(&reversed, channel)]);
            counts[here] += 1;
        }
        // Spread about evenly.
        assert!(counts.iter().all(|&n| n > 800), "{counts:?}");
        let mut more = urls.clone();
        more.push("redis://d".into());
        for channel in &channels {
            let now = &more[rendezvous(&more, channel)];
            let before = &urls[rendezvous(&urls, channel)];
            assert!(
                now == before || now == "redis://d",
                "{channel} moved between old shards"
            );
        }
    }
}
