//! `switchboard-engine`: channels and everything about them, with no socket and no wire
//! format in it (docs/ARCHITECTURE.md).
//!
//! - [`Engine`] owns the channels of one server. A subscriber gets a [`Subscription`]:
//!   the backlog it asked for (`since`, `epoch`: see `recovery.rs`), then live
//!   [`Outbound`] events; a publication is delivered to every subscriber once stored,
//!   with an id one more than the channel's last. Presence counts a user once however
//!   many connections it has; typing and binary data go to the others; a subscriber
//!   that falls behind is cut off and resumes without losing anything.
//! - [`options`]: namespaces, the options each channel takes from its name.
//! - [`names`]: channel and user names, and channels limited to named users.
//! - Backends (`backend/`) number, store and carry publications: the single node
//!   ([`Engine::local`] over a [`store::Store`], memory or SQLite) and a cluster over
//!   Redis ([`Engine::redis`]), behind one trait.
//!
//! A door (the room protocol, later others) turns a [`Subscription`]'s events into its
//! wire format; [`Delivery`] caches each publication's encoding per format, so a channel
//! of ten thousand members encodes a publication once.

mod backend;
mod engine;
pub mod hooks;
pub mod names;
pub mod options;
mod queue;
mod recovery;
pub mod store;

pub use backend::redis::{RedisConfig, RedisTopology};
pub use backend::Outcome;
pub use engine::{
    Clock, Delivery, Draft, Ended, Engine, EngineConfig, EngineError, Format, Inbox, InboxWaker,
    Outbound, Receipt, Resume, Subscription, FORMATS,
};
pub use hooks::{Hook, HookConfig, HookKind};
pub use names::{valid_channel, valid_user_name, CHANNEL_RULE, USER_NAME_RULE};
pub use options::{ChannelOptions, NamespaceTable, Namespaces, Recover};
pub use store::{MemoryStore, Position, Publication, SqliteStore, Store, StoreError};
