//! A network path that stops forwarding without closing (a dead NAT entry, a frozen proxy, a
//! half-open TCP connection): the liveness ping finds it within the configured interval, the
//! daemon reconnects once the path works again, and nothing saved meanwhile is lost.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use post_save::{Registry, State, db};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixStream};
use tokio::sync::watch;

use crate::support::db::TestDb;
use crate::support::{PATIENCE, config, install, start_via};

const LIVENESS: Duration = Duration::from_secs(1);

/// Where the proxy forwards to: the test server, by TCP or by its Unix socket.
#[derive(Clone)]
enum Upstream {
    Tcp(String, u16),
    Unix(std::path::PathBuf),
}

/// A TCP proxy to the test server that can freeze: while frozen it reads nothing, writes
/// nothing and closes nothing, on old connections and on new ones alike.
struct Proxy {
    port: u16,
    frozen: watch::Sender<bool>,
}

impl Proxy {
    async fn start(upstream: Upstream) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("addr").port();
        let (frozen, _) = watch::channel(false);
        let gate = frozen.subscribe();
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else { return };
                let upstream = upstream.clone();
                let gate = gate.clone();
                tokio::spawn(async move {
                    match upstream {
                        Upstream::Tcp(host, port) => {
                            let Ok(server) = TcpStream::connect((host.as_str(), port)).await else { return };
                            pipe(client, server, gate).await;
                        }
                        Upstream::Unix(path) => {
                            let Ok(server) = UnixStream::connect(&path).await else { return };
                            pipe(client, server, gate).await;
                        }
                    }
                });
            }
        });
        Proxy { port, frozen }
    }

    fn freeze(&self, on: bool) {
        self.frozen.send_replace(on);
    }
}

/// Copies both ways, chunk by chunk, each chunk only while the gate is open.
async fn pipe<S: AsyncRead + AsyncWrite + Send + 'static>(client: TcpStream, server: S, gate: watch::Receiver<bool>) {
    let (cr, cw) = client.into_split();
    let (sr, sw) = tokio::io::split(server);
    let up = tokio::spawn(copy_gated(cr, sw, gate.clone()));
    let down = tokio::spawn(copy_gated(sr, cw, gate));
    let _ = tokio::join!(up, down);
}

async fn copy_gated(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    mut gate: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if gate.wait_for(|frozen| !frozen).await.is_err() {
            return;
        }
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        // Bytes read just before a freeze are held, not delivered, until it thaws.
        if gate.wait_for(|frozen| !frozen).await.is_err() || to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

fn upstream(db: &TestDb) -> Upstream {
    let pg = db::resolve(Some(&db.conninfo)).expect("conninfo");
    let port = pg.get_ports().first().copied().unwrap_or(5432);
    match pg.get_hosts().first().expect("a host") {
        tokio_postgres::config::Host::Tcp(h) => Upstream::Tcp(h.clone(), port),
        tokio_postgres::config::Host::Unix(dir) => Upstream::Unix(dir.join(format!(".s.PGSQL.{port}"))),
    }
}

async fn wait_state(state: &mut watch::Receiver<State>, what: &str, pred: impl FnMut(&State) -> bool) {
    match tokio::time::timeout(PATIENCE, state.wait_for(pred)).await {
        Ok(Ok(_)) => {}
        _ => panic!("daemon never reached {what}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_path_that_stops_forwarding_is_found_within_the_liveness_interval_and_nothing_is_lost() {
    let db = TestDb::new().await;
    db.psql_ok("CREATE TABLE item (id bigserial PRIMARY KEY, name text NOT NULL)");
    let text = format!(
        "[daemon]\nliveness = \"{}ms\"\nreconnect_min = \"100ms\"\nreconnect_max = \"500ms\"\n\n[[watch]]\ntable = \"public.item\"\n",
        LIVENESS.as_millis()
    );
    let cfg = config(&text);
    install(&db, &cfg).await;

    let proxy = Proxy::start(upstream(&db)).await;
    let direct = db::resolve(Some(&db.conninfo)).expect("conninfo");
    let mut pg = tokio_postgres::Config::new();
    pg.host("127.0.0.1")
        .port(proxy.port)
        .user(direct.get_user().expect("user"))
        .dbname(direct.get_dbname().expect("dbname"))
        .connect_timeout(Duration::from_secs(1));
    let mut daemon = start_via(pg, cfg, &mut Registry::new()).await;

    db.psql_ok("INSERT INTO item (name) VALUES ('before')");
    assert_eq!(daemon.next().await.instance["name"], "before");

    // The path goes silent; the server itself stays up and keeps taking saves.
    proxy.freeze(true);
    let frozen_at = Instant::now();
    db.psql_ok("INSERT INTO item (name) SELECT 'during-' || g FROM generate_series(1, 50) g");
    let mut state = daemon.state.clone();
    wait_state(&mut state, "reconnecting", |s| matches!(s, State::Reconnecting { .. })).await;
    let found_after = frozen_at.elapsed();
    eprintln!("dead path found after {found_after:?} (liveness {LIVENESS:?})");
    // Within the interval, plus a little for the scheduler of a loaded 2-core machine.
    assert!(found_after <= LIVENESS + Duration::from_millis(300), "found after {found_after:?}");
    assert!(daemon.stats.snapshot().liveness_failures >= 1);

    // Reconnecting while the path is still dead times out instead of hanging.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(matches!(*state.borrow(), State::Reconnecting { .. }), "{:?}", *state.borrow());

    proxy.freeze(false);
    wait_state(&mut state, "listening again", |s| matches!(s, State::Listening { .. })).await;
    db.psql_ok("INSERT INTO item (name) VALUES ('after')");

    let mut names = BTreeSet::new();
    while !names.contains("after") || names.len() < 51 {
        let event = daemon.next().await;
        names.insert(event.instance["name"].as_str().expect("name").to_owned());
    }
    let expected: BTreeSet<String> = (1..=50).map(|g| format!("during-{g}")).chain(["after".to_owned()]).collect();
    assert_eq!(names, expected, "every save made while the path was dead arrives");
    daemon.stop().await;
}

/// The ping itself must not disturb a healthy connection: over several intervals nothing is
/// dropped and nothing reconnects.
#[tokio::test]
async fn a_healthy_connection_answers_every_ping() {
    let db = TestDb::new().await;
    db.psql_ok("CREATE TABLE item (id bigserial PRIMARY KEY, name text NOT NULL)");
    // A 1 s interval (a ping every 500 ms, answered within 500 ms): with 200 ms, a test suite
    // loading both cores once stalled an answer past its 100 ms and failed this test.
    let cfg = config("[daemon]\nliveness = \"1s\"\n\n[[watch]]\ntable = \"public.item\"\n");
    install(&db, &cfg).await;
    let pg = db::resolve(Some(&db.conninfo)).expect("conninfo");
    let mut daemon = start_via(pg, cfg, &mut Registry::new()).await;
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let stats = daemon.stats.snapshot();
    assert_eq!((stats.liveness_failures, stats.reconnects), (0, 0));
    db.psql_ok("INSERT INTO item (name) VALUES ('x')");
    assert_eq!(daemon.next().await.instance["name"], "x");
    daemon.stop().await;
}
