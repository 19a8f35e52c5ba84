//! Namespaces: what a channel keeps and allows, chosen by its name.
//!
//! `[namespaces.NS]` applies to every channel whose name starts with its `prefix`
//! (default `"NS:"`); where several prefixes match, the longest wins, so Pusher-style
//! names (`prefix = "private-prices-"`) can have a namespace too. Every other channel
//! belongs to the default namespace, `[channels]`. A namespace's unset options take the
//! built-in defaults, not those of `[channels]`: what a namespace does can be read from
//! its own table. Unknown keys are refused, naming the table and the key.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde::de::Error as _;
use serde::{Deserialize, Deserializer};

/// What a channel keeps and allows. Every door, and every backend, applies them.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct ChannelOptions {
    /// Publications kept per channel; `None` keeps all, 0 keeps none.
    pub history_size: Option<usize>,
    /// Seconds a publication is kept (0: forever). Older ones are neither replayed nor
    /// kept.
    pub history_ttl_secs: u64,
    /// Whether the channel knows who is in it (`members`, `GET .../members`).
    pub presence: bool,
    /// Whether `join` and `leave` events are sent.
    pub join_leave: bool,
    /// Whether clients may send typing indicators.
    pub typing: bool,
    /// Whether clients may publish (messages and binary data); `false` leaves it to the
    /// HTTP API.
    pub client_publish: bool,
    /// What a joiner without `since` is sent first.
    pub recover: Recover,
    /// Whether subscribing takes a subscription token naming the channel (the
    /// Centrifugo door checks it; doors without such tokens may not join at all).
    pub subscribe_token: bool,
}

impl Default for ChannelOptions {
    fn default() -> Self {
        Self {
            history_size: None,
            history_ttl_secs: 0,
            presence: true,
            join_leave: true,
            typing: true,
            client_publish: true,
            recover: Recover::Stream,
            subscribe_token: false,
        }
    }
}

impl ChannelOptions {
    /// How long publications are kept, if not forever.
    pub fn history_ttl(&self) -> Option<Duration> {
        (self.history_ttl_secs > 0).then(|| Duration::from_secs(self.history_ttl_secs))
    }

    /// Whether history is trimmed at all (by size or by age).
    pub fn trims(&self) -> bool {
        self.history_size.is_some() || self.history_ttl_secs > 0
    }
}

/// What a joiner is replayed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Recover {
    /// The most recent publications without `since`; with it, everything missed.
    #[default]
    Stream,
    /// Only the latest publication without `since` (a price ticker's current value);
    /// with `since`, what is kept after it.
    Latest,
}

/// One `[namespaces.NS]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Namespace {
    pub prefix: String,
    pub options: ChannelOptions,
}

/// `[namespaces]`: each table's name, prefix and options.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NamespaceTable(pub BTreeMap<String, Namespace>);

impl<'de> Deserialize<'de> for NamespaceTable {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        type Raw = BTreeMap<String, serde_json::Map<String, serde_json::Value>>;
        let mut table = BTreeMap::new();
        for (name, mut keys) in Raw::deserialize(deserializer)? {
            let fail = |why: String| D::Error::custom(format!("[namespaces.{name}]: {why}"));
            let prefix = match keys.remove("prefix") {
                None => format!("{name}:"),
                Some(serde_json::Value::String(prefix)) if !prefix.is_empty() => prefix,
                Some(_) => return Err(fail("`prefix` must be a non-empty string".into())),
            };
            let options = ChannelOptions::deserialize(serde_json::Value::Object(keys))
                .map_err(|e| fail(e.to_string()))?;
            table.insert(name, Namespace { prefix, options });
        }
        Ok(Self(table))
    }
}

/// Every namespace, ready to look channels up in.
#[derive(Debug, Clone, Default)]
pub struct Namespaces {
    default: Arc<ChannelOptions>,
    /// Longest prefix first.
    prefixed: Vec<(String, Arc<ChannelOptions>)>,
}

impl Namespaces {
    /// Checks that no two namespaces share a prefix.
    pub fn new(default: ChannelOptions, table: &NamespaceTable) -> Result<Self, String> {
        let mut prefixed: Vec<(String, Arc<ChannelOptions>)> = Vec::new();
        let mut owners: BTreeMap<&str, &str> = BTreeMap::new();
        for (name, namespace) in &table.0 {
            if let Some(other) = owners.insert(&namespace.prefix, name) {
                return Err(format!(
                    "[namespaces.{other}] and [namespaces.{name}] have the same prefix {:?}",
                    namespace.prefix
                ));
            }
            prefixed.push((
                namespace.prefix.clone(),
                Arc::new(namespace.options.clone()),
            ));
        }
        prefixed.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then_with(|| a.0.cmp(&b.0)));
        Ok(Self {
            default: Arc::new(default),
            prefixed,
        })
    }

    /// The options of `channel`'s namespace.
    pub fn options(&self, channel: &str) -> &Arc<ChannelOptions> {
        // A channel of a Pusher app other than the first (`{id}~name`) takes the
        // options of its name.
        let channel = channel.split_once('~').map_or(channel, |(_, name)| name);
        self.prefixed
            .iter()
            .find(|(prefix, _)| channel.starts_with(prefix.as_str()))
            .map_or(&self.default, |(_, options)| options)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(toml_like: serde_json::Value) -> Result<NamespaceTable, String> {
        serde_json::from_value(toml_like).map_err(|e| e.to_string())
    }

    #[test]
    fn the_longest_prefix_wins_and_others_are_the_default() {
        let table = table(serde_json::json!({
            "prices": {"history_size": 1, "presence": false, "client_publish": false, "recover": "latest"},
            "private": {"prefix": "private-", "typing": false},
            "private_prices": {"prefix": "private-prices-", "history_ttl_secs": 60},
        }))
        .unwrap();
        let default = ChannelOptions {
            history_size: Some(1000),
            ..ChannelOptions::default()
        };
        let namespaces = Namespaces::new(default.clone(), &table).unwrap();
        let prices = namespaces.options("prices:btc");
        assert_eq!(prices.history_size, Some(1));
        assert!(!prices.presence && !prices.client_publish);
        assert_eq!(prices.recover, Recover::Latest);
        assert!(!namespaces.options("private-chat").typing);
        let both = namespaces.options("private-prices-eur");
        assert_eq!(both.history_ttl_secs, 60);
        // Unset options are the built-in defaults, not [channels]'.
        assert!(both.typing);
        assert_eq!(both.history_size, None);
        assert_eq!(**namespaces.options("lobby"), default);
        assert_eq!(
            **namespaces.options("prices"),
            default,
            "the prefix is `prices:`"
        );
        assert_eq!(**namespaces.options("xprices:btc"), default);
    }

    #[test]
    fn unknown_keys_and_shared_prefixes_are_refused() {
        let error = table(serde_json::json!({"chat": {"histroy_size": 5}})).unwrap_err();
        assert!(error.contains("[namespaces.chat]"), "{error}");
        assert!(error.contains("histroy_size"), "{error}");
        let error = table(serde_json::json!({"chat": {"prefix": ""}})).unwrap_err();
        assert!(error.contains("prefix"), "{error}");
        let error = table(serde_json::json!({"chat": {"recover": "sometimes"}})).unwrap_err();
        assert!(error.contains("sometimes"), "{error}");
        let shared = table(serde_json::json!({"a": {"prefix": "x:"}, "x": {}})).unwrap();
        let error = Namespaces::new(ChannelOptions::default(), &shared).unwrap_err();
        assert!(error.contains("same prefix"), "{error}");
    }
}
