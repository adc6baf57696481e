//! The integration tests, in one test binary (as ripgrep has them): a module per area, the
//! helpers once, in [`support`]. A test's name starts with its area,
//! `wal::saves_made_while_the_daemon_is_down_arrive_once_after_it_starts`; one area runs with
//! `cargo nextest run -E 'binary(it) & test(/^wal::/)'` (`binary(it)`: the library's unit tests
//! have module paths too).
//!
//! Every test runs against a real PostgreSQL, in a database of its own ([`support::db`]); the
//! CLI tests run the built `post-save` binary.

mod support;

mod backpressure;
mod brokers;
mod celery;
mod cli;
mod cluster;
mod column_types;
mod crash;
mod dead;
mod demo;
mod django_shop;
mod doctor;
mod email;
mod end_to_end;
mod event_contract;
mod events;
mod exec_handler;
mod exit_codes;
mod failover;
mod filter_errors;
mod grants;
mod ha;
mod hostile_names;
mod install_locks;
mod late_commit;
mod liveness;
mod log_pipe;
mod logging;
mod metrics;
mod notify;
mod partitions;
mod pk_change_order;
mod pooler;
mod replay;
mod replica;
mod restart;
mod retention;
mod retry_backoff;
mod routing;
mod schema_change;
mod sql_handler;
mod systemd;
mod tls;
mod wal;
mod wal_big;
mod wal_errors;
mod wal_parity;
mod wal_relations;
mod webhook;
