//! post-save: Django's `post_save` signal for PostgreSQL itself.
//!
//! Every committed INSERT or UPDATE (and, when asked, DELETE) on a watched table becomes a
//! [`SaveEvent`] — `sender`, `instance`, `created`, `update_fields`, … — whichever client made
//! it: an ORM, bulk SQL, another service, or a person in `psql`. AFTER ROW triggers capture the
//! save (into the ledger `post_save.event` for `durable` tables) and NOTIFY the channel
//! `post_save`; the [`Daemon`] LISTENs, catches up on anything it missed, and routes each event
//! to the handlers registered for it, one row's events in commit order.
//!
//! Handlers come from the config file (`[[handler]]`, kinds `log` and `exec`) or from Rust code:
//!
//! ```no_run
//! use post_save::{Config, Daemon, Receiver, Registry, TableName};
//! use post_save::handler::{handler_fn, HandlerError};
//!
//! #[tokio::main]
//! async fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     let config = Config::load("post-save.toml".as_ref())?;
//!     let mut registry = Registry::from_config(&config)?;
//!     let orders = TableName::new("public", "shop_order");
//!     registry.register(
//!         Receiver::new("send-confirmation").sender(&orders).created(true),
//!         handler_fn(|event| async move {
//!             println!("order {} created by {}", event.instance["id"], event.actor.role);
//!             Ok::<(), HandlerError>(())
//!         }),
//!     )?;
//!     // The URL, TLS settings (sslmode, sslrootcert, …) of `[database]`, and the PG* variables.
//!     let pg = post_save::db::resolve_with(config.database.url.as_deref(), &config.database.tls())?;
//!     let shutdown = async {
//!         let _ = tokio::signal::ctrl_c().await;
//!     };
//!     Daemon::new(config, registry, pg).run(shutdown).await?;
//!     Ok(())
//! }
//! ```

pub mod cluster;
pub mod config;
pub mod daemon;
pub mod db;
mod delivery;
pub mod doctor;
pub mod event;
pub mod expr;
pub mod grants;
pub mod handler;
mod lease;
mod ledger;
mod listener;
mod metrics;
pub mod name;
mod parts;
pub mod registry;
mod router;
pub mod stats;
pub mod systemd;
pub mod template;
pub mod triggers;
pub mod wal;

pub use config::{Config, ConfigError, Mode, Signal};
pub use daemon::{Daemon, DaemonError, State};
pub use event::SaveEvent;
pub use name::TableName;
pub use registry::{Receiver, Registry};
pub use stats::{Stats, StatsSnapshot};
