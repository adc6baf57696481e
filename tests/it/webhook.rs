//! `kind = "webhook"` handlers in the embedded daemon against a real PostgreSQL and real HTTP
//! receivers on loopback: Standard Webhooks signatures checked by the reference Python library,
//! retries on 5xx, `Retry-After`, a hanging receiver cut off by the timeout, CloudEvents bodies,
//! custom headers, dead letters for 4xx and 3xx, and `handlers list` hiding credentials.
//!
//! Most receivers are wiremock servers answering from a script ([`Script`]); the hanging one is
//! a bare TCP listener, to see the connection being closed.
#![cfg(feature = "webhook")]

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use post_save::handler::{Delivery, Failure, Handler};
use serde_json::Value;
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

use crate::support;
use crate::support::child::binary;
use crate::support::db::TestDb;
use crate::support::{PATIENCE, Running, config, install, start, wait_for_sql};

const SHOP: &str = "CREATE TABLE shop_order (
    id bigserial PRIMARY KEY, user_id bigint NOT NULL, product text NOT NULL,
    quantity integer NOT NULL DEFAULT 1)";

/// A Standard Webhooks secret (`whsec_` + base64 of 32 bytes).
const SECRET: &str = "whsec_QmVzdCBrZXB0IG91dCBvZiBldmVyeSBsb2cgbGluZSE=";

/// Fast retries for tests.
const FAST_RETRY: &str = "retry = { attempts = 5, backoff = \"20ms\", max_backoff = \"200ms\" }";

const PENDING: &str = "SELECT count(*) FROM post_save.event WHERE handled_at IS NULL";
const DEAD: &str = "SELECT count(*) FROM post_save.dead_letter";

/// A TOML basic string holding `s` (a JSON string literal is one).
fn toml_str(s: &str) -> String {
    serde_json::to_string(s).expect("a string serializes")
}

/// A `[[handler]]` table of kind webhook on `public.shop_order`; `extra` adds keys.
fn webhook(name: &str, url: &str, extra: &str) -> String {
    format!(
        "[[handler]]\nname = {}\nsender = \"public.shop_order\"\nkind = \"webhook\"\nurl = {}\n{extra}\n",
        toml_str(name),
        toml_str(url)
    )
}

/// A database with `shop_order` (durable), the triggers, and a daemon running `handlers`.
async fn shop_with(handlers: &str) -> (TestDb, Running) {
    let db = TestDb::new().await;
    db.psql_ok(SHOP);
    let text = format!(
        "[daemon]\nsweep_interval = \"1h\"\n\n[[watch]]\ntable = \"public.shop_order\"\nmode = \"durable\"\n\n{handlers}"
    );
    let config = config(&text);
    install(&db, &config).await;
    let daemon = start(&db, config).await;
    (db, daemon)
}

/// A file holding [`SECRET`] (with the trailing newline editors add) and its TOML key.
fn secret_file(dir: &Path) -> String {
    let file = dir.join("webhook-secret");
    std::fs::write(&file, format!("{SECRET}\n")).expect("write secret");
    format!("secret_file = {}", toml_str(&file.to_string_lossy()))
}

/// One request a receiver got.
#[derive(Clone, Debug)]
struct Hit {
    at: Instant,
    headers: BTreeMap<String, String>,
    body: String,
}

impl Hit {
    fn header(&self, name: &str) -> &str {
        self.headers.get(name).map_or("", String::as_str)
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.body))
    }
}

/// A wiremock responder answering the n-th request with the n-th response of its script (the
/// last one from then on) and recording every request.
#[derive(Clone)]
struct Script {
    responses: Arc<Vec<ResponseTemplate>>,
    hits: Arc<Mutex<Vec<Hit>>>,
    count: watch::Sender<usize>,
}

impl Script {
    fn new(responses: Vec<ResponseTemplate>) -> Script {
        Script { responses: Arc::new(responses), hits: Arc::default(), count: watch::Sender::new(0) }
    }

    /// Serves the script at `POST <route>` of `server`.
    async fn mount(&self, server: &MockServer, route: &str) {
        Mock::given(method("POST")).and(path(route)).respond_with(self.clone()).mount(server).await;
    }

    /// Waits for `n` requests and returns every request so far.
    async fn wait_for(&self, n: usize) -> Vec<Hit> {
        let mut count = self.count.subscribe();
        let waited = tokio::time::timeout(PATIENCE, count.wait_for(|c| *c >= n)).await;
        assert!(waited.is_ok(), "timed out waiting for {n} requests; got {}", self.hits().len());
        self.hits()
    }

    fn hits(&self) -> Vec<Hit> {
        self.hits.lock().expect("hits lock").clone()
    }
}

impl Respond for Script {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let headers = request
            .headers
            .iter()
            .map(|(k, v)| (k.as_str().to_owned(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
            .collect();
        let body = String::from_utf8(request.body.clone()).expect("UTF-8 body");
        let n = {
            let mut hits = self.hits.lock().expect("hits lock");
            hits.push(Hit { at: Instant::now(), headers, body });
            hits.len()
        };
        self.count.send_replace(n);
        self.responses[(n - 1).min(self.responses.len() - 1)].clone()
    }
}

/// Runs the Standard Webhooks reference verifier (Python `standardwebhooks`) on a request;
/// `true` when it accepts it.
async fn python_verifies(secret: &str, body: &str, headers: &BTreeMap<String, String>) -> bool {
    const VERIFY: &str = r#"
import json, sys
from standardwebhooks.webhooks import Webhook, WebhookVerificationError
secret, body_path, headers_path = sys.argv[1:4]
body = open(body_path, encoding="utf-8").read()
headers = json.load(open(headers_path))
try:
    Webhook(secret).verify(body, headers)
except WebhookVerificationError as e:
    print("rejected:", e)
    sys.exit(1)
print("verified")
"#;
    let dir = TempDir::new().expect("tempdir");
    let (body_path, headers_path) = (dir.path().join("body"), dir.path().join("headers.json"));
    std::fs::write(&body_path, body).expect("write body");
    std::fs::write(&headers_path, serde_json::to_string(headers).expect("headers JSON")).expect("write headers");
    let secret = secret.to_owned();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(support::db::python_venv())
            .args(["-c", VERIFY, &secret])
            .args([&body_path, &headers_path])
            .output()
            .expect("run python")
    })
    .await
    .expect("python task");
    let stdout = String::from_utf8_lossy(&out.stdout);
    match out.status.code() {
        Some(0) if stdout.contains("verified") => true,
        Some(1) if stdout.contains("rejected") => false,
        _ => panic!("verifier failed: {}\n{stdout}{}", out.status, String::from_utf8_lossy(&out.stderr)),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saved_row_arrives_signed_and_the_reference_library_verifies_it() {
    let dir = TempDir::new().expect("tempdir");
    let server = MockServer::start().await;
    let receiver = Script::new(vec![ResponseTemplate::new(204)]);
    receiver.mount(&server, "/hooks/orders").await;
    let url = format!("{}/hooks/orders?source=test", server.uri());
    let (db, daemon) = shop_with(&webhook("orders", &url, &secret_file(dir.path()))).await;

    db.psql_ok("INSERT INTO shop_order (user_id, product, quantity) VALUES (7, 'espresso machine', 2)");
    let hit = receiver.wait_for(1).await.remove(0);
    let event = hit.json();
    assert_eq!(event["sender"], "public.shop_order");
    assert_eq!(event["op"], "insert");
    assert_eq!(event["created"], true);
    assert_eq!(event["instance"]["product"], "espresso machine");
    assert_eq!(event["using"], db.name.as_str());
    assert_eq!(hit.header("content-type"), "application/json");
    assert!(hit.header("user-agent").starts_with("post-save/"), "{:?}", hit.headers);
    assert_eq!(hit.header("webhook-id"), event["id"].as_i64().expect("a ledger id").to_string());
    let sent_at: u64 = hit.header("webhook-timestamp").parse().expect("unix seconds");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    assert!(now.abs_diff(sent_at) < 60, "timestamp {sent_at}, now {now}");
    assert!(hit.header("webhook-signature").starts_with("v1,"), "{:?}", hit.headers);

    assert!(python_verifies(SECRET, &hit.body, &hit.headers).await, "a genuine request");
    let tampered = hit.body.replace("espresso machine", "espresso machinE");
    assert!(!python_verifies(SECRET, &tampered, &hit.headers).await, "a tampered body");
    let other = "whsec_T3RoZXIgc2VjcmV0LCBvdGhlciBzaWduYXR1cmVzLg==";
    assert!(!python_verifies(other, &hit.body, &hit.headers).await, "another secret");

    wait_for_sql(&db, PENDING, 0).await;
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_server_errors_then_success_is_three_attempts() {
    let server = MockServer::start().await;
    let receiver = Script::new(vec![
        ResponseTemplate::new(500).set_body_string("database is down"),
        ResponseTemplate::new(503),
        ResponseTemplate::new(200),
    ]);
    receiver.mount(&server, "/hook").await;
    let (db, daemon) = shop_with(&webhook("flaky", &format!("{}/hook", server.uri()), FAST_RETRY)).await;

    db.psql_ok("INSERT INTO shop_order (user_id, product) VALUES (1, 'book')");
    receiver.wait_for(3).await;
    wait_for_sql(&db, PENDING, 0).await;
    // Acknowledged once every handler finished: the count of attempts is final.
    let hits = receiver.hits();
    assert_eq!(hits.len(), 3, "{hits:?}");
    assert!(hits.iter().all(|h| h.header("webhook-id") == hits[0].header("webhook-id")), "one id for every attempt");
    assert_eq!(hits[0].body, hits[2].body);
    wait_for_sql(&db, DEAD, 0).await;
    let stats = daemon.stats.snapshot();
    assert_eq!(stats.retried, 2, "{stats:?}");
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_sets_the_wait_before_the_next_attempt() {
    let server = MockServer::start().await;
    let receiver =
        Script::new(vec![ResponseTemplate::new(429).insert_header("Retry-After", "2"), ResponseTemplate::new(200)]);
    receiver.mount(&server, "/hook").await;
    // The backoff alone would retry after ~50 ms; the header asks for 2 s (under max_backoff).
    let retry = "retry = { attempts = 3, backoff = \"50ms\", max_backoff = \"30s\" }";
    let (db, daemon) = shop_with(&webhook("polite", &format!("{}/hook", server.uri()), retry)).await;

    db.psql_ok("INSERT INTO shop_order (user_id, product) VALUES (1, 'book')");
    let hits = receiver.wait_for(2).await;
    let gap = hits[1].at - hits[0].at;
    assert!(gap >= Duration::from_millis(1950), "second attempt after {gap:?}");
    assert!(gap < Duration::from_secs(15), "second attempt after {gap:?}");
    wait_for_sql(&db, PENDING, 0).await;
    wait_for_sql(&db, DEAD, 0).await;
    daemon.stop().await;
}

/// What the hanging receiver saw.
#[derive(Debug, Default)]
struct HangLog {
    /// When the first request arrived, and when its connection was closed by the client.
    first: Option<(Instant, Option<Instant>)>,
    /// The `webhook-id` of every request.
    ids: Vec<String>,
}

/// A receiver that never answers the first request (and notes when the client gives up on the
/// connection), and answers every later one with 200.
async fn hanging_receiver() -> (String, Arc<Mutex<HangLog>>, watch::Receiver<usize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}/hook", listener.local_addr().expect("address"));
    let log = Arc::new(Mutex::new(HangLog::default()));
    let (count_tx, count_rx) = watch::channel(0usize);
    let shared = Arc::clone(&log);
    tokio::spawn(async move {
        for n in 1usize.. {
            let Ok((mut stream, _)) = listener.accept().await else { return };
            let (log, count_tx) = (Arc::clone(&shared), count_tx.clone());
            tokio::spawn(async move {
                let Some(head) = read_request(&mut stream).await else { return };
                let arrived = Instant::now();
                log.lock().expect("log").ids.push(header_of(&head, "webhook-id"));
                if n == 1 {
                    log.lock().expect("log").first = Some((arrived, None));
                    count_tx.send_replace(n);
                    // Hang; a read returns only when the client closes the connection.
                    let mut rest = [0u8; 1024];
                    while matches!(stream.read(&mut rest).await, Ok(1..)) {}
                    log.lock().expect("log").first = Some((arrived, Some(Instant::now())));
                } else {
                    let answer = "HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";
                    let _ = stream.write_all(answer.as_bytes()).await;
                    let _ = stream.shutdown().await;
                }
                count_tx.send_replace(n);
            });
        }
    });
    (url, log, count_rx)
}

/// Reads one HTTP/1.1 request (head and `Content-Length` body); returns its head.
async fn read_request(stream: &mut TcpStream) -> Option<String> {
    let mut data = Vec::new();
    let mut buf = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = stream.read(&mut buf).await.ok().filter(|n| *n > 0)?;
        data.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&data[..head_end]).into_owned();
    let length: usize = header_of(&head, "content-length").parse().unwrap_or(0);
    while data.len() < head_end + length {
        let n = stream.read(&mut buf).await.ok().filter(|n| *n > 0)?;
        data.extend_from_slice(&buf[..n]);
    }
    Some(head)
}

fn header_of(head: &str, name: &str) -> String {
    head.lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case(name))
        .map(|(_, v)| v.trim().to_owned())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_receiver_is_cut_off_at_the_timeout_and_retried() {
    let (url, log, mut count) = hanging_receiver().await;
    let extra = format!("timeout = \"500ms\"\n{FAST_RETRY}");
    let (db, daemon) = shop_with(&webhook("slow", &url, &extra)).await;

    db.psql_ok("INSERT INTO shop_order (user_id, product) VALUES (1, 'book')");
    let retried = tokio::time::timeout(PATIENCE, count.wait_for(|n| *n >= 2)).await;
    assert!(retried.is_ok(), "no second attempt: {log:?}");
    wait_for_sql(&db, PENDING, 0).await;
    wait_for_sql(&db, DEAD, 0).await;
    // The first attempt's connection was closed by the daemon once the attempt timed out.
    let deadline = Instant::now() + PATIENCE;
    let (arrived, closed) = loop {
        if let Some((arrived, Some(closed))) = log.lock().expect("log").first {
            break (arrived, closed);
        }
        assert!(Instant::now() < deadline, "the hanging connection was never closed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let held = closed - arrived;
    assert!(held >= Duration::from_millis(400), "closed after {held:?}, before the timeout");
    assert!(held < Duration::from_secs(10), "closed after {held:?}");
    let ids = log.lock().expect("log").ids.clone();
    assert_eq!(ids.len(), 2, "{ids:?}");
    assert!(!ids[0].is_empty() && ids[0] == ids[1], "{ids:?}");
    daemon.stop().await;
}

/// A webhook handler built from its config table outside the daemon, and an event for it.
fn standalone(url: &str, extra: &str) -> (Arc<dyn Handler>, post_save::SaveEvent) {
    let text = format!("[[watch]]\ntable = \"public.shop_order\"\n\n{}", webhook("alone", url, extra));
    let handler = config(&text).handlers[0].kind.build("alone").expect("build");
    let event = serde_json::from_value(serde_json::json!({
        "id": 5, "signal": "post_save", "sender": "public.shop_order", "op": "insert", "created": true,
        "pk": {"id": 1}, "instance": {"id": 1}, "raw": false, "using": "shop", "txid": 1,
        "at": "2026-01-01T00:00:00+00:00", "actor": {"role": "app", "pid": 1}
    }))
    .expect("event");
    (handler, event)
}

fn first_attempt() -> Delivery {
    Delivery { handler: "alone".into(), attempt: 1, max_attempts: 1 }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_timeout_cuts_a_hanging_receiver_by_itself() {
    let (url, _log, _count) = hanging_receiver().await;
    let (handler, event) = standalone(&url, "timeout = \"1m\"\nrequest_timeout = \"300ms\"");
    let started = Instant::now();
    let error = handler.handle(&event, &first_attempt()).await.expect_err("a hanging receiver cannot succeed");
    assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
    assert_eq!(error.failure, Failure::Retry, "{error}");
    assert!(error.message.contains("timed out"), "{error}");
    assert!(!error.message.contains("127.0.0.1"), "the URL stays out of the message: {error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_reuse_the_connection() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}/hook", listener.local_addr().expect("address"));
    let accepted = Arc::new(AtomicUsize::new(0));
    let (answered_tx, mut answered) = watch::channel(0usize);
    let counter = Arc::clone(&accepted);
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            let answered_tx = answered_tx.clone();
            tokio::spawn(async move {
                // Keep-alive: answer requests on this connection until the client closes it,
                // the body a moment after the head, as from a receiver that streams it.
                while read_request(&mut stream).await.is_some() {
                    let head = "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n";
                    if stream.write_all(head.as_bytes()).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    if stream.write_all(b"c\r\n{\"ok\": true}\r\n0\r\n\r\n").await.is_err() {
                        return;
                    }
                    answered_tx.send_modify(|n| *n += 1);
                }
            });
        }
    });
    let (handler, event) = standalone(&url, "");
    // A connection goes back to the pool once its answer's body is read, which races with the
    // next request, so a few requests may open new connections; an answer whose body is left
    // unread closes its connection, and every request would.
    for n in 1..=20 {
        handler.handle(&event, &first_attempt()).await.expect("delivered");
        let done = tokio::time::timeout(PATIENCE, answered.wait_for(|a| *a >= n)).await;
        assert!(done.is_ok(), "answer {n} never finished");
        if accepted.load(Ordering::SeqCst) < n {
            return;
        }
    }
    panic!("20 requests, 20 connections: none was reused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloudevents_bodies_and_custom_headers_arrive() {
    let server = MockServer::start().await;
    let receiver = Script::new(vec![ResponseTemplate::new(202)]);
    receiver.mount(&server, "/ce").await;
    let extra = "format = \"cloudevents\"\nheaders = { \"X-Tenant\" = \"shop\", Authorization = \"Bearer t0ken\" }";
    let (db, daemon) = shop_with(&webhook("ce", &format!("{}/ce", server.uri()), extra)).await;

    db.psql_ok("INSERT INTO shop_order (user_id, product) VALUES (3, 'kettle')");
    let hit = receiver.wait_for(1).await.remove(0);
    assert_eq!(hit.header("content-type"), "application/cloudevents+json");
    assert_eq!(hit.header("x-tenant"), "shop");
    assert_eq!(hit.header("authorization"), "Bearer t0ken");
    assert_eq!(hit.header("webhook-signature"), "", "no secret, no signature");
    let ce = hit.json();
    let data = &ce["data"];
    assert_eq!(ce["specversion"], "1.0");
    assert_eq!(ce["id"], data["id"].as_i64().expect("ledger id").to_string());
    assert_eq!(ce["id"], hit.header("webhook-id"));
    assert_eq!(ce["source"], format!("postgres://{}/public.shop_order", db.name));
    assert_eq!(ce["type"], "post_save.insert");
    assert_eq!(ce["subject"], "1");
    assert_eq!(ce["time"], data["at"]);
    assert_eq!(ce["datacontenttype"], "application/json");
    assert_eq!(data["instance"]["product"], "kettle");
    assert_eq!(data["sender"], "public.shop_order");
    wait_for_sql(&db, PENDING, 0).await;
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_errors_and_redirects_dead_letter_at_once() {
    let server = MockServer::start().await;
    let rejects = Script::new(vec![
        ResponseTemplate::new(400).set_body_string("{\"error\": \"unknown product\"}\n"),
        ResponseTemplate::new(200),
    ]);
    rejects.mount(&server, "/rejects").await;
    let redirects = Script::new(vec![
        ResponseTemplate::new(302).insert_header("Location", "https://elsewhere.example/hook"),
        ResponseTemplate::new(200),
    ]);
    redirects.mount(&server, "/redirects").await;
    let handlers = format!(
        "{}{}",
        webhook("rejects", &format!("{}/rejects", server.uri()), FAST_RETRY),
        webhook("redirects", &format!("{}/redirects", server.uri()), FAST_RETRY)
    );
    let (db, daemon) = shop_with(&handlers).await;

    db.psql_ok("INSERT INTO shop_order (user_id, product) VALUES (1, 'unobtainium')");
    wait_for_sql(&db, DEAD, 2).await;
    wait_for_sql(&db, PENDING, 0).await;
    let rows = db
        .client()
        .await
        .query("SELECT handler, attempts, last_error FROM post_save.dead_letter ORDER BY handler", &[])
        .await
        .expect("dead letters");
    let dead: Vec<(String, i32, String)> = rows.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect();
    assert_eq!(dead.len(), 2, "{dead:?}");
    let (redirected, rejected) = (&dead[0], &dead[1]);
    assert_eq!((rejected.0.as_str(), rejected.1), ("rejects", 1), "{dead:?}");
    assert!(rejected.2.contains("400 Bad Request") && rejected.2.contains("unknown product"), "{dead:?}");
    assert_eq!((redirected.0.as_str(), redirected.1), ("redirects", 1), "{dead:?}");
    assert!(redirected.2.contains("302 Found") && redirected.2.contains("https://elsewhere.example/hook"), "{dead:?}");
    assert_eq!(rejects.hits().len(), 1, "one attempt");
    assert_eq!(redirects.hits().len(), 1, "one attempt, the redirect not followed");
    daemon.stop().await;
}

/// Runs the real `post-save` binary with `args`, with no inherited configuration.
fn post_save(args: &[&str]) -> std::process::Output {
    let mut cmd = assert_cmd::Command::from_std(binary());
    cmd.env_remove("HOOK_SECRET").args(args).timeout(PATIENCE).output().expect("run post-save")
}

#[test]
fn handlers_list_shows_the_target_without_credentials() {
    let dir = TempDir::new().expect("tempdir");
    let handler = webhook(
        "billing",
        "https://user:p4ssw0rd@Hooks.Example.com:8443/in/orders?token=qu3ry#frag",
        &format!("{}\nheaders = {{ Authorization = \"Bearer b34rer\" }}", secret_file(dir.path())),
    );
    let config = dir.path().join("post-save.toml");
    std::fs::write(&config, format!("[[watch]]\ntable = \"public.shop_order\"\n\n{handler}")).expect("write config");
    let config = config.to_str().expect("UTF-8 path");
    let out = post_save(&["--config", config, "--database-url", "host=/nonexistent", "handlers", "list", "--json"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}: {stdout}{}", out.status, String::from_utf8_lossy(&out.stderr));
    let list: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"));
    assert_eq!(list[0]["kind"], "webhook");
    assert_eq!(list[0]["target"], "POST https://hooks.example.com:8443/in/orders");
    let secret_body = SECRET.trim_start_matches("whsec_");
    for hidden in ["p4ssw0rd", "qu3ry", "b34rer", secret_body] {
        assert!(!stdout.contains(hidden), "{hidden} leaked: {stdout}");
    }

    // A header that would replace the signature is a config error naming its key.
    let bad = dir.path().join("bad.toml");
    let handler = webhook("billing", "https://hooks.example.com/in", "headers = { webhook-signature = \"v1,forged\" }");
    std::fs::write(&bad, format!("[[watch]]\ntable = \"public.shop_order\"\n\n{handler}")).expect("write config");
    let out = post_save(&["--config", bad.to_str().expect("UTF-8 path"), "config", "check"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{stderr}");
    assert!(stderr.contains("handler[0].headers") && stderr.contains("cannot be replaced"), "{stderr}");
}
