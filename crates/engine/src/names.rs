//! Channel and user names, and channels limited to named users.
//!
//! A channel name is 1-200 characters of ASCII letters, digits and `. _ : # , = @ ; -`
//! (the Pusher libraries' set plus `:` and `#`). The comma-separated list after the first
//! `#` names the only users who may subscribe: `dm:#alice,bob` is alice's and bob's,
//! `notify:#alice` and `#alice` are alice's alone. Publishing from the server is always
//! allowed; doors refuse everyone else's subscription before it reaches the engine.

/// The rule [`valid_channel`] checks, in words, for error messages.
pub const CHANNEL_RULE: &str =
    "channel names are 1-200 characters of A-Z a-z 0-9 and . _ : # , = @ ; - (# is %23 in a URL)";

/// The rule [`valid_user_name`] checks, in words, for error messages.
pub const USER_NAME_RULE: &str =
    "user names are 1-64 characters, no control characters or surrounding spaces";

/// Whether `channel` is a valid channel name.
pub fn valid_channel(channel: &str) -> bool {
    (1..=200).contains(&channel.len())
        && channel
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:#,=@;-".contains(&b))
}

/// Whether `name` is a valid user name: 1-64 characters, no control characters.
pub fn valid_user_name(name: &str) -> bool {
    let chars = name.chars().count();
    (1..=64).contains(&chars) && !name.chars().any(char::is_control) && name.trim() == name
}

/// Whether `channel` is one whose subscribers need the Pusher door's signature
/// (`private-`, `private-encrypted-`, `presence-`): no other door lets clients join it.
pub fn needs_signature(channel: &str) -> bool {
    channel.starts_with("private-") || channel.starts_with("presence-")
}

/// The users `channel` is limited to, when its name has a `#`.
pub fn allowed_users(channel: &str) -> Option<impl Iterator<Item = &str>> {
    let (_, users) = channel.split_once('#')?;
    Some(users.split(',').filter(|user| !user.is_empty()))
}

/// Whether `user` may subscribe to `channel`: any user unless the name limits it.
pub fn may_subscribe(channel: &str, user: &str) -> bool {
    allowed_users(channel).map_or(true, |mut users| users.any(|allowed| allowed == user))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_and_user_names() {
        assert!(valid_channel("lobby"));
        assert!(valid_channel("team-a.b:c_1"));
        assert!(valid_channel("private-prices-eur=usd@x;y,z"));
        assert!(valid_channel("dm:#alice,bob"));
        assert!(valid_channel(&"a".repeat(200)));
        assert!(!valid_channel(""));
        assert!(!valid_channel(&"a".repeat(201)));
        assert!(!valid_channel("a b"));
        assert!(!valid_channel("a/b"));
        assert!(!valid_channel("a%23b"));
        assert!(valid_user_name("Alice"));
        assert!(valid_user_name("Zoë ☕"));
        assert!(!valid_user_name(""));
        assert!(!valid_user_name(" padded"));
        assert!(!valid_user_name("new\nline"));
    }

    #[test]
    fn signed_channels() {
        assert!(needs_signature("private-a"));
        assert!(needs_signature("private-encrypted-a"));
        assert!(needs_signature("presence-a"));
        assert!(!needs_signature("public-a"));
        assert!(!needs_signature("a-private-b"));
    }

    #[test]
    fn limited_channels_admit_only_their_users() {
        assert!(may_subscribe("lobby", "anyone"));
        assert!(may_subscribe("dm:#alice,bob", "alice"));
        assert!(may_subscribe("dm:#alice,bob", "bob"));
        assert!(!may_subscribe("dm:#alice,bob", "carol"));
        assert!(!may_subscribe("dm:#alice,bob", "alice,bob"));
        assert!(may_subscribe("notify:#alice", "alice"));
        assert!(!may_subscribe("notify:#alice", "alicex"));
        assert!(may_subscribe("#alice", "alice"));
        assert!(!may_subscribe("#alice", ""));
        // Only the first `#` starts the list; an empty list admits nobody.
        assert!(may_subscribe("a#b#c", "b#c"));
        assert!(!may_subscribe("nobody:#", "nobody"));
        assert_eq!(
            allowed_users("dm:#alice,,bob").unwrap().collect::<Vec<_>>(),
            ["alice", "bob"]
        );
    }
}
