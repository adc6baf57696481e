//! The session's two connections and the proof that both still work: the dedicated LISTEN
//! connection, and pings sent on the work connection that must come back on it.

use std::future::poll_fn;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio_postgres::types::Type;
use tokio_postgres::{AsyncMessage, Client};

use crate::db::{self, CHANNEL, DbError, Work};
use crate::name::quote_ident;
use crate::stats::Stats;

/// Notifications buffered between the connection and the listener loop; when full, the
/// connection stops being read and the rest wait in PostgreSQL's queue.
const NOTICE_BUFFER: usize = 4096;

/// Opens the dedicated LISTEN connection; its notifications arrive on the returned channel,
/// which closes when the connection does.
/// The LISTEN connection: notifications on the post_save channel go to the first receiver,
/// the echoes of this session's liveness pings (on its private `ping_channel`) to the second.
pub(super) async fn open_listener(
    pg: &crate::db::Settings,
    ping_channel: &str,
) -> Result<(Client, mpsc::Receiver<String>, mpsc::Receiver<String>, tokio::task::JoinHandle<()>), DbError> {
    let (client, mut connection) = db::start_up(pg).await?;
    let (tx, rx) = mpsc::channel(NOTICE_BUFFER);
    let (echo_tx, echo_rx) = mpsc::channel(16);
    let pings = ping_channel.to_owned();
    let task = tokio::spawn(async move {
        loop {
            match poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(n))) if n.channel() == pings => {
                    // A full buffer means the liveness task is behind; dropping an echo only
                    // makes a ping look late, never a dead connection look alive.
                    let _ = echo_tx.try_send(n.payload().to_owned());
                }
                Some(Ok(AsyncMessage::Notification(n))) => {
                    if tx.send(n.payload().to_owned()).await.is_err() {
                        return;
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "listen connection failed");
                    return;
                }
                None => return,
            }
        }
    });
    let listen = format!("LISTEN {}; LISTEN {}", quote_ident(CHANNEL), quote_ident(ping_channel));
    client.batch_execute(&listen).await.map_err(DbError::Query)?;
    Ok((client, rx, echo_rx, task))
}

/// Pings through both connections every half `every`: a NOTIFY on this session's private
/// channel, sent on the work connection, must come back on the LISTEN connection within half
/// `every`. So a connection cut anywhere (even a half-open TCP connection that never errors) is
/// found within `every`. Returns when a ping failed; the caller then drops both connections.
pub(super) async fn liveness(
    work: Arc<Work>,
    channel: String,
    mut echoes: mpsc::Receiver<String>,
    every: Duration,
    alive: watch::Sender<Instant>,
    stats: Arc<Stats>,
) -> Duration {
    let half = (every / 2).max(Duration::from_millis(5));
    let mut ticks = tokio::time::interval(half);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    let mut nonce = 0u64;
    loop {
        ticks.tick().await;
        nonce += 1;
        let expected = nonce.to_string();
        let sent = Instant::now();
        let deadline = tokio::time::Instant::now() + half;
        let echoed = tokio::time::timeout_at(deadline, async {
            let params: [(&(dyn tokio_postgres::types::ToSql + Sync), Type); 2] =
                [(&channel, Type::TEXT), (&expected, Type::TEXT)];
            work.client.query_typed_one("SELECT pg_notify($1, $2)", &params).await.ok()?;
            while let Some(echo) = echoes.recv().await {
                if echo == expected {
                    return Some(());
                }
            }
            None
        })
        .await;
        match echoed {
            Ok(Some(())) => {
                alive.send_replace(Instant::now());
            }
            _ => {
                Stats::bump(&stats.liveness_failures);
                return sent.elapsed();
            }
        }
    }
}

/// A task aborted when its handle is dropped: a session's connections and pings end with it.
pub(super) struct AbortOnDrop(pub(super) tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
