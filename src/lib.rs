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

mod capture;
mod cli;
mod cluster;
pub mod config;
mod daemon;
pub mod db;
mod dispatch;
mod doctor;
pub mod event;
mod expr;
pub mod handler;
mod install;
#[cfg(test)]
mod layers;
mod lease;
mod metrics;
mod name;
mod registry;
mod stats;
mod systemd;
#[cfg_attr(
    not(any(feature = "nats", feature = "redis", feature = "amqp", feature = "email")),
    allow(dead_code, reason = "templates serve the handler kinds of the default build")
)]
mod template;

pub use capture::wal::{Blocked, Blocker};
pub use config::{Config, ConfigError, Mode, Signal};
pub use daemon::{Daemon, DaemonError, Reloader, State};
pub use event::SaveEvent;
pub use name::TableName;
pub use registry::{Receiver, Registry};
pub use stats::{Stats, StatsSnapshot};

/// Runs the `post-save` command line (what the `post-save` binary does) and returns its exit
/// code. An embedder runs a [`Daemon`] instead.
#[doc(hidden)]
pub fn command_line() -> std::process::ExitCode {
    cli::main()
}

/// Not API: what post-save's own tests reach into (private clusters, installing the capture,
/// the handler kinds' options). Hidden, and free to change in any release.
#[doc(hidden)]
pub mod testing {
    pub use crate::capture::wal::slot_name;
    pub use crate::expr::Expr;

    /// Throwaway PostgreSQL clusters.
    pub mod cluster {
        pub use crate::cluster::*;
    }

    /// Installing, checking and removing the capture.
    pub mod install {
        pub use crate::install::{TriggerError, check, install, plan, remove};
    }

    /// The handler kinds' own items.
    pub mod kinds {
        #[allow(unused_imports, reason = "empty in a build without the handler kinds")]
        pub use crate::handler::kinds::*;
    }
}
