//! `post-save demo`: the whole path on a throwaway database, in one command.
//!
//! Without `DATABASE_URL` (or `--database-url`) it starts a private PostgreSQL from the
//! installed server binaries in a temporary directory and removes it on Ctrl-C.

use std::io::Write;

use crate::cluster::{ClusterOptions, TempCluster};
use crate::config::Config;
use crate::daemon::{Daemon, State};
use crate::db;
use crate::install;
use crate::registry::Registry;
use anyhow::{Context, Result};

use crate::cli::{Global, shutdown_signal};

const SHOP_ORDER: &str = "CREATE TABLE IF NOT EXISTS public.shop_order (
    id          bigserial   PRIMARY KEY,
    user_id     bigint      NOT NULL,
    product     text        NOT NULL,
    quantity    integer     NOT NULL DEFAULT 1,
    created_at  timestamptz NOT NULL DEFAULT now()
)";

const CONFIG: &str = r#"
[[watch]]
table = "public.shop_order"
mode = "durable"

[[handler]]
name = "print-orders"
sender = "public.shop_order"
kind = "log"
fields = ["id", "op", "created", "pk", "instance", "update_fields", "actor"]

[[handler]]
name = "order-confirmation"
sender = "public.shop_order"
created = true
kind = "exec"
command = ["/bin/sh", "-c", "cat >/dev/null; echo \"confirmation email for order $POST_SAVE_PK queued (event $POST_SAVE_EVENT_ID)\""]
log_output = true
timeout = "10s"
"#;

pub async fn run(global: &Global) -> Result<u8> {
    // Ctrl-C at any point, even while the cluster starts, ends in the cleanup below; so do
    // SIGTERM and a closed terminal (SIGHUP).
    let shutdown = shutdown_signal()?;
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    let hung_up = shutdown.clone();
    tokio::spawn(async move {
        if hangup.recv().await.is_some() {
            hung_up.cancel();
            tracing::info!("SIGHUP received");
        }
    });
    let url = global.database_url.clone().or_else(|| std::env::var("DATABASE_URL").ok().filter(|u| !u.is_empty()));
    let (cluster, conninfo) = match url {
        Some(url) => (None, url),
        None => {
            eprintln!("DATABASE_URL is not set: starting a throwaway PostgreSQL");
            let cluster = tokio::task::spawn_blocking(|| TempCluster::start(ClusterOptions::default()))
                .await
                .context("starting PostgreSQL")??;
            let conninfo = cluster.conninfo("postgres");
            (Some(cluster), conninfo)
        }
    };
    let result = if shutdown.is_cancelled() { Ok(0) } else { demo(&conninfo, cluster.is_some(), shutdown).await };
    if let Some(cluster) = cluster {
        tokio::task::spawn_blocking(move || drop(cluster)).await.ok();
        // The terminal may be gone (SIGHUP): a failed write is no reason to panic.
        let _ = writeln!(std::io::stderr(), "temporary PostgreSQL stopped and removed");
    }
    result
}

async fn demo(conninfo: &str, temporary: bool, shutdown: tokio_util::sync::CancellationToken) -> Result<u8> {
    let pg = db::resolve(Some(conninfo))?;
    let (mut client, _task) = db::connect(&pg).await?;
    client.batch_execute(SHOP_ORDER).await.context("creating shop_order")?;
    db::migrate(&mut client).await?;
    let mut config = Config::parse(CONFIG)?;
    config.handlers.iter_mut().for_each(|h| h.kind.default_database(&pg));
    install::install(&mut client, &config).await?;
    banner(conninfo, temporary)?;

    let daemon = Daemon::new(config.clone(), Registry::from_config(&config)?, pg);
    let mut state = daemon.state();
    tokio::spawn(async move {
        if state.wait_for(|s| matches!(s, State::Listening { .. })).await.is_ok() {
            let insert = "INSERT INTO shop_order (user_id, product, quantity) VALUES (1, 'demo: first order', 1)";
            if let Err(e) = client.batch_execute(insert).await {
                tracing::warn!(error = %e, "demo insert failed");
            }
        }
    });
    daemon.run(shutdown.cancelled_owned()).await?;
    Ok(0)
}

fn banner(conninfo: &str, temporary: bool) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    let note = if temporary { " (temporary: removed on Ctrl-C)" } else { "" };
    writeln!(out, "post-save demo")?;
    writeln!(out, "  database:  {conninfo}{note}")?;
    writeln!(out, "  watching:  public.shop_order (durable)")?;
    writeln!(out, "  handlers:  print-orders (log, every save), order-confirmation (exec, new orders)")?;
    writeln!(out)?;
    writeln!(out, "Save rows from a second terminal and watch the events arrive here:")?;
    writeln!(
        out,
        "  psql \"{conninfo}\" -c \"INSERT INTO shop_order (user_id, product, quantity) VALUES (42, 'espresso machine', 1)\""
    )?;
    writeln!(out, "  psql \"{conninfo}\" -c \"UPDATE shop_order SET quantity = quantity + 1\"")?;
    writeln!(out, "Ctrl-C stops the demo.")?;
    writeln!(out)?;
    out.flush()
}
