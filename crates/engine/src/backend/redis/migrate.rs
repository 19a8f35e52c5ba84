//! From the first key layout (`P:seq:{ch}` and the like, no hash tags) to the tagged
//! one, once per Redis, at the first start of a node of this version: a channel's
//! counter, epoch, history and nonces are renamed in place (so ids, epochs and `since`
//! carry on), hooks still waiting move to their channel's queue, and the presence of
//! the old nodes (which must all be stopped first) is dropped, to be told again by the
//! new ones.

use redis::AsyncCommands;
use tracing::{info, warn};

use super::topology::{control_key, key, Conn};
use crate::store::StoreError;

/// The old layout's kinds of channel key that keep what clients rely on.
const DURABLE: [&str; 5] = ["seq", "epoch", "history", "nonces", "nonce-times"];

/// Kinds of the old layout that held presence (dropped).
const PRESENCE: [&str; 4] = ["presence", "pinfo", "members", "alive"];

/// Migrates this Redis (once; another node migrating at the same moment is waited
/// for).
pub(super) async fn to_tagged_keys(prefix: &str, conn: &mut Conn) -> Result<(), StoreError> {
    let layout = control_key(prefix, "layout");
    let done: Option<String> = conn.get(&layout).await?;
    if done.as_deref() == Some("2") {
        return Ok(());
    }
    let lock = control_key(prefix, "migrating");
    let took: bool = redis::cmd("SET")
        .arg(&lock)
        .arg(1)
        .arg("NX")
        .arg("PX")
        .arg(120_000)
        .query_async::<Option<String>>(conn)
        .await?
        .is_some();
    if !took {
        // Another node migrates: wait for it.
        for _ in 0..1200 {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            let done: Option<String> = conn.get(&layout).await?;
            if done.as_deref() == Some("2") {
                return Ok(());
            }
        }
        return Err(StoreError::Unavailable(
            "another node's migration of the Redis keys did not finish",
        ));
    }
    let mut renamed = 0usize;
    for kind in DURABLE {
        let old = format!("{prefix}:{kind}:");
        for name in scan(conn, &format!("{old}*")).await? {
            let Some(channel) = name.strip_prefix(&old) else {
                continue;
            };
            let moved: bool = conn.rename_nx(&name, key(prefix, channel, kind)).await?;
            if moved {
                renamed += 1;
            } else {
                warn!(key = %name, "not migrated: its new key exists");
            }
        }
    }
    let hooks = move_hooks(prefix, conn).await?;
    let mut dropped = 0usize;
    for kind in PRESENCE {
        for name in scan(conn, &format!("{prefix}:{kind}:*")).await? {
            let _: () = conn.del(&name).await?;
            dropped += 1;
        }
    }
    for name in ["rooms", "nodes", "occupied", "notices"] {
        let _: () = conn.del(format!("{prefix}:{name}")).await?;
    }
    let _: () = conn.set(&layout, "2").await?;
    let _: () = conn.del(&lock).await?;
    if renamed + hooks + dropped > 0 {
        info!(
            renamed,
            hooks, dropped, "Redis keys migrated to channel hash tags"
        );
    }
    Ok(())
}

async fn scan(conn: &mut Conn, pattern: &str) -> Result<Vec<String>, StoreError> {
    let mut cursor = 0u64;
    let mut names = Vec::new();
    loop {
        let (next, page): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await?;
        names.extend(page);
        if next == 0 {
            return Ok(names);
        }
        cursor = next;
    }
}

/// The old queue's hooks (due, leased and delayed) into their channels' queues, in
/// order, under the old numbering; returns how many.
async fn move_hooks(prefix: &str, conn: &mut Conn) -> Result<usize, StoreError> {
    let (list, leased, pending, seq) = (
        format!("{prefix}:hooks"),
        format!("{prefix}:hooks:leased"),
        format!("{prefix}:hooks:pending"),
        format!("{prefix}:hooks:seq"),
    );
    let mut due: Vec<String> = conn.zrange(&leased, 0, -1).await?;
    due.extend(conn.lrange::<_, Vec<String>>(&list, 0, -1).await?);
    let delayed: Vec<(String, f64)> = conn.zrange_withscores(&pending, 0, -1).await?;
    let numbered: Option<u64> = conn.get(&seq).await?;
    let mut channels = std::collections::BTreeSet::new();
    for item in &due {
        let Some(channel) = item
            .split_once('\n')
            .and_then(|(_, json)| serde_json::from_str::<serde_json::Value>(json).ok())
            .and_then(|hook| hook["channel"].as_str().map(str::to_owned))
        else {
            continue;
        };
        let _: () = conn.rpush(key(prefix, &channel, "hooks"), item).await?;
        channels.insert(channel);
    }
    for (name, at) in &delayed {
        let Some(channel) = name.split('\n').nth(1) else {
            continue;
        };
        let _: () = conn
            .zadd(key(prefix, channel, "hooks:pending"), name, *at)
            .await?;
        channels.insert(channel.to_owned());
    }
    for channel in &channels {
        if let Some(numbered) = numbered {
            let _: () = conn
                .set(key(prefix, channel, "hooks:seq"), numbered)
                .await?;
        }
        let _: () = conn.sadd(control_key(prefix, "hooks"), channel).await?;
    }
    let _: () = conn.del(&[list, leased, pending, seq]).await?;
    Ok(due.len() + delayed.len())
}
