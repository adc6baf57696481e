//! `kind = "celery"` against the real thing: a save made with psql becomes a task that a real
//! Celery worker (the test venv's, see `support::db::python_venv`) runs, through the local Redis at
//! 127.0.0.1:6379; the message on the queue is what Celery itself sends; a broker that is down
//! is a retry; `handlers list` shows the broker without its password.
//!
//! Every test uses a queue of its own on Redis database [`REDIS_DB`] and removes its keys.
#![cfg(feature = "celery")]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use post_save::SaveEvent;
use post_save::config::Section;
use post_save::handler::{Delivery, Failure};
use post_save::testing::kinds::CeleryOptions;
use serde_json::{Value, json};
use tempfile::TempDir;

use crate::support;
use crate::support::child::binary;
use crate::support::db::{TestDb, python_venv};
use crate::support::{config, install, start};

/// The Redis database the tests use (Celery's own default is 0; keep clear of it).
const REDIS_DB: u8 = 11;
/// A worker takes seconds to start on a busy machine.
const WORKER_PATIENCE: Duration = Duration::from_secs(90);

const SHOP: &str = "CREATE TABLE shop_order (
    id bigserial PRIMARY KEY, user_id bigint NOT NULL, product text NOT NULL)";

/// The tasks module the worker loads: `shop.tasks.record` appends what it got as a JSON line.
const TASKS: &str = r#"
import json, os
from celery import Celery

app = Celery("tasks", broker=os.environ["BROKER"])
app.conf.worker_enable_remote_control = False
app.conf.broker_connection_retry_on_startup = True

@app.task(name="shop.tasks.record", bind=True)
def record(self, order_id, product=None, user=None):
    line = {"id": self.request.id, "order_id": order_id, "product": product, "user": user,
            "retries": self.request.retries}
    with open(os.environ["OUT"], "a") as f:
        f.write(json.dumps(line) + "\n")
"#;

fn broker() -> String {
    format!("redis://127.0.0.1:6379/{REDIS_DB}")
}

/// A queue name no other test or run uses.
fn unique_queue(what: &str) -> String {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    format!("post-save-test-{what}-{}-{nanos:x}", std::process::id())
}

async fn redis() -> redis::aio::MultiplexedConnection {
    redis::Client::open(broker())
        .expect("redis url")
        .get_multiplexed_async_connection()
        .await
        .expect("the tests need Redis on 127.0.0.1:6379")
}

/// Removes the queue's list and what kombu keeps beside it.
async fn forget_queue(queue: &str) {
    let mut conn = redis().await;
    let keys = [queue.to_owned(), format!("_kombu.binding.{queue}"), format!("_kombu.binding_permanent.{queue}")];
    let _: Result<i64, _> = redis::cmd("DEL").arg(&keys).query_async(&mut conn).await;
}

/// A child process in a process group of its own, killed (group and all) when dropped.
struct Peer {
    child: Child,
    log: PathBuf,
}

impl Peer {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let Ok(pid) = i32::try_from(self.child.id()) else { return };
        let _ = killpg(Pid::from_raw(pid), Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

/// Starts a Celery worker on `broker` for `queue` with the [`TASKS`] module from `dir`, writing
/// to `out`.
fn worker(dir: &Path, broker: &str, queue: &str, out: &Path) -> Peer {
    use std::os::unix::process::CommandExt as _;
    std::fs::write(dir.join("tasks.py"), TASKS).expect("write tasks.py");
    let log = dir.join("worker.log");
    let log_file = std::fs::File::create(&log).expect("worker log");
    let child = Command::new(python_venv())
        .args(["-m", "celery", "-A", "tasks", "worker", "--pool", "solo", "--loglevel", "INFO", "-Q", queue])
        .args(["--without-heartbeat", "--without-gossip", "--without-mingle", "--hostname", &format!("{queue}@test")])
        .current_dir(dir)
        .env("PYTHONPATH", dir)
        .env("BROKER", broker)
        .env("OUT", out)
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().expect("dup log"))
        .stderr(log_file)
        .process_group(0)
        .spawn()
        .expect("could not start the celery worker");
    Peer { child, log }
}

/// Waits until `path` holds a line, or panics with `context()` after `patience`.
async fn first_line(path: &Path, patience: Duration, context: impl Fn() -> String) -> Value {
    let deadline = Instant::now() + patience;
    loop {
        if let Some(line) = std::fs::read_to_string(path).ok().and_then(|t| t.lines().next().map(str::to_owned)) {
            return serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        }
        assert!(Instant::now() < deadline, "the task did not run; worker log:\n{}", context());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn handler_table(name: &str, broker: &str, queue: &str, extra: &str) -> String {
    format!(
        "[[handler]]\nname = \"{name}\"\nsender = \"public.shop_order\"\nkind = \"celery\"\n\
         broker = \"{broker}\"\ntask = \"shop.tasks.record\"\nqueue = \"{queue}\"\n{extra}\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_psql_insert_runs_the_task_on_a_real_worker() {
    let dir = TempDir::new().expect("tempdir");
    let out = dir.path().join("calls.jsonl");
    let queue = unique_queue("worker");
    let worker = worker(dir.path(), &broker(), &queue, &out);

    let db = TestDb::new().await;
    db.psql_ok(SHOP);
    let text = format!(
        "[daemon]\nsweep_interval = \"1h\"\n[[watch]]\ntable = \"public.shop_order\"\nmode = \"durable\"\n\n{}",
        handler_table(
            "confirm",
            &broker(),
            &queue,
            "args = [\"instance.id\"]\nkwargs = { product = \"instance.product\", user = \"instance.user_id\" }"
        )
    );
    let config = config(&text);
    install(&db, &config).await;
    let mut daemon = start(&db, config).await;

    db.psql_ok("INSERT INTO shop_order (user_id, product) VALUES (7, 'espresso ''machine''')");
    let event = daemon.next().await;
    let call = first_line(&out, WORKER_PATIENCE, || worker.log()).await;
    let event_id = event.id.expect("a durable event");
    assert_eq!(
        call,
        json!({
            "id": format!("post-save:{}:{event_id}:confirm", db.name),
            "order_id": 1,
            "product": "espresso 'machine'",
            "user": 7,
            "retries": 0,
        })
    );
    daemon.stop().await;
    support::wait_for_sql(&db, "SELECT count(*) FROM post_save.event WHERE handled_at IS NULL", 0).await;
    drop(worker);
    forget_queue(&queue).await;
}

fn sample_event() -> SaveEvent {
    serde_json::from_value(json!({
        "id": 42, "signal": "post_save", "sender": "public.shop_order", "op": "insert",
        "created": true, "pk": {"id": 9},
        "instance": {"id": 9, "product": "it's", "user_id": 7},
        "old": null, "update_fields": null, "raw": false, "using": "shop", "txid": 5,
        "at": "2026-11-25T00:00:00Z",
        "actor": {"role": "app", "application_name": "psql", "client_addr": null, "pid": 1, "actor": null},
        "origin": null
    }))
    .expect("a valid event")
}

fn options(toml: &str) -> CeleryOptions {
    let mut section = Section::from_document(toml, "handler[0]").expect("toml");
    let options = CeleryOptions::parse(&mut section).expect("valid options");
    section.finish().expect("every key taken");
    options
}

fn delivery(handler: &str, attempt: u32) -> Delivery {
    Delivery { handler: handler.to_owned(), attempt, max_attempts: 5 }
}

#[tokio::test]
async fn the_message_on_the_queue_is_celery_protocol_v2_in_kombus_envelope() {
    let queue = unique_queue("envelope");
    let toml = format!(
        "broker = \"{}\"\ntask = \"shop.tasks.record\"\nqueue = \"{queue}\"\nargs = [\"instance.id\", \"pk\"]\n\
         kwargs = {{ product = \"instance.product\", missing = \"old\" }}\n",
        broker()
    );
    let handler = options(&toml).build("envelope").expect("build");
    let event = sample_event();
    handler.handle(&event, &delivery("envelope", 1)).await.expect("enqueued");
    handler.handle(&event, &delivery("envelope", 2)).await.expect("enqueued again");

    let mut conn = redis().await;
    let raw: Vec<String> =
        redis::cmd("LRANGE").arg(&queue).arg(0).arg(-1).query_async(&mut conn).await.expect("lrange");
    forget_queue(&queue).await;
    assert_eq!(raw.len(), 2, "two attempts, two messages");
    let first: Value = serde_json::from_str(&raw[1]).expect("JSON envelope");
    let second: Value = serde_json::from_str(&raw[0]).expect("JSON envelope");

    let body = base64::engine::general_purpose::STANDARD.decode(first["body"].as_str().unwrap()).expect("base64");
    let body: Value = serde_json::from_slice(&body).expect("JSON body");
    assert_eq!(
        body,
        json!([[9, {"id": 9}], {"missing": null, "product": "it's"},
               {"callbacks": null, "errbacks": null, "chain": null, "chord": null}])
    );
    let task_id = "post-save:shop:42:envelope";
    let origin = first["headers"]["origin"].as_str().expect("origin").to_owned();
    assert!(origin.starts_with("post-save@"), "{origin}");
    let tag = first["properties"]["delivery_tag"].as_str().expect("delivery tag").to_owned();
    assert_eq!(uuid::Uuid::parse_str(&tag).map(|u| u.get_version_num()), Ok(4));
    let mut expected = json!({
        "body": first["body"],
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {
            "lang": "py", "task": "shop.tasks.record", "id": task_id, "shadow": null, "eta": null,
            "expires": null, "group": null, "group_index": null, "retries": 0, "timelimit": [null, null],
            "root_id": task_id, "parent_id": null, "argsrepr": "[9, {'id': 9}]",
            "kwargsrepr": "{'missing': None, 'product': \"it's\"}", "origin": origin,
            "ignore_result": false, "replaced_task_nesting": 0, "stamped_headers": null, "stamps": {}
        },
        "properties": {
            "correlation_id": task_id, "reply_to": "", "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue}, "priority": 0,
            "body_encoding": "base64", "delivery_tag": tag
        }
    });
    assert_eq!(first, expected);
    // A second attempt is the same task (same id: an idempotency key), a new delivery.
    assert_ne!(second["properties"]["delivery_tag"], first["properties"]["delivery_tag"]);
    expected["properties"]["delivery_tag"] = second["properties"]["delivery_tag"].clone();
    assert_eq!(second, expected);
}

#[tokio::test]
async fn an_event_without_ledger_id_gets_a_random_uuid() {
    let queue = unique_queue("uuid");
    let toml = format!("broker = \"{}\"\ntask = \"t\"\nqueue = \"{queue}\"\n", broker());
    let handler = options(&toml).build("h").expect("build");
    let mut event = sample_event();
    event.id = None;
    handler.handle(&event, &delivery("h", 1)).await.expect("enqueued");
    let mut conn = redis().await;
    let raw: Vec<String> =
        redis::cmd("LRANGE").arg(&queue).arg(0).arg(-1).query_async(&mut conn).await.expect("lrange");
    forget_queue(&queue).await;
    let message: Value = serde_json::from_str(&raw[0]).expect("JSON");
    let id = message["headers"]["id"].as_str().expect("id");
    assert!(uuid::Uuid::parse_str(id).is_ok(), "{id}");
    assert_eq!(message["properties"]["correlation_id"], id);
}

#[tokio::test]
async fn an_argument_over_a_missing_field_is_permanent() {
    let toml = format!("broker = \"{}\"\ntask = \"t\"\nargs = [\"instance.nope\"]\n", broker());
    let handler = options(&toml).build("h").expect("build");
    let e = handler.handle(&sample_event(), &delivery("h", 1)).await.expect_err("cannot compute the argument");
    assert_eq!(e.failure, Failure::Permanent, "{e}");
    assert!(e.message.contains("argument 1"), "{e}");
}

#[tokio::test]
async fn a_broker_that_is_down_is_retried_and_build_does_not_connect() {
    // Port 1: nothing listens, connecting is refused at once.
    let options = options("broker = \"redis://127.0.0.1:1/0\"\ntask = \"t\"\n");
    let handler = options.build("h").expect("build never connects");
    for attempt in 1..=2 {
        let e = handler.handle(&sample_event(), &delivery("h", attempt)).await.expect_err("broker is down");
        assert_eq!(e.failure, Failure::Retry, "{e}");
        assert!(e.message.contains("redis://127.0.0.1:1/0"), "{e}");
    }
}

#[test]
fn bad_options_are_config_errors() {
    for (toml, needle) in [
        ("broker = \"redis://127.0.0.1/0\"\n", "missing required key"),
        ("task = \"t\"\nbroker = \"redis://:hunter2@127.0.0.1/0\"\n", "password_env"),
        ("task = \"t\"\nbroker = \"http://localhost/\"\n", "not a Redis URL"),
        #[cfg(not(feature = "amqp"))]
        ("task = \"t\"\nbroker = \"amqp://guest@localhost//\"\n", "`amqp` feature"),
        #[cfg(feature = "amqp")]
        ("task = \"t\"\nbroker = \"amqp://guest:hunter2@localhost//\"\n", "password_env"),
        ("task = \"t\"\nargs = [\"instanse.id\"]\n", "instanse"),
        ("task = \"t\"\nkwargs = { a = \"instance.\" }\n", "`a`"),
        ("task = \"t\"\npassword_env = \"A\"\npassword_file = \"/b\"\n", "not both"),
        ("task = \"t\"\nqueue = \"\"\n", "1 to 255 bytes"),
    ] {
        let mut section = Section::from_document(toml, "handler[0]").expect("toml");
        let e = CeleryOptions::parse(&mut section).expect_err(toml).to_string();
        assert!(e.contains(needle), "{toml}: {e}");
        assert!(!e.contains("hunter2"), "{e}");
    }
}

#[test]
fn handlers_list_shows_the_target_without_the_password() {
    let dir = TempDir::new().expect("tempdir");
    let path = dir.path().join("celery.toml");
    std::fs::write(
        &path,
        "[[watch]]\ntable = \"public.shop_order\"\n\n[[handler]]\nname = \"confirm\"\nkind = \"celery\"\n\
         broker = \"redis://broker.internal:6380/2\"\npassword_env = \"CELERY_TEST_BROKER_PASSWORD\"\n\
         task = \"shop.tasks.send_order_confirmation\"\n",
    )
    .expect("write config");
    let out = assert_cmd::Command::from_std(binary())
        .args(["--config", path.to_str().unwrap(), "--database-url", "host=/nonexistent", "handlers", "list", "--json"])
        .env("CELERY_TEST_BROKER_PASSWORD", "hunter2")
        .timeout(Duration::from_secs(30))
        .output()
        .expect("run post-save");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    let list: Value = serde_json::from_str(&stdout).expect("JSON");
    assert_eq!(list[0]["kind"], "celery");
    assert_eq!(
        list[0]["target"],
        "redis://broker.internal:6380/2 task shop.tasks.send_order_confirmation queue celery"
    );
    assert!(!stdout.contains("hunter2"));
}

/// Celery over RabbitMQ (the local server on 5672, guest/guest).
#[cfg(feature = "amqp")]
mod amqp {
    use super::*;

    const AMQP_BROKER: &str = "amqp://guest@127.0.0.1:5672//";

    /// Deletes the queue and the exchange of the same name that Celery declares for it.
    async fn forget_amqp_queue(queue: &str) {
        use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
        let props = lapin::ConnectionProperties::default();
        let Ok(conn) = lapin::Connection::connect("amqp://guest:guest@127.0.0.1:5672/%2f", props).await else { return };
        if let Ok(ch) = conn.create_channel().await {
            let _ = ch.queue_delete(queue.into(), QueueDeleteOptions::default()).await;
            let _ = ch.exchange_delete(queue.into(), ExchangeDeleteOptions::default()).await;
        }
        let _ = conn.close(0, "done".into()).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_psql_insert_runs_the_task_on_a_real_worker_over_rabbitmq() {
        let dir = TempDir::new().expect("tempdir");
        let out = dir.path().join("calls.jsonl");
        let queue = unique_queue("amqp");
        let db = TestDb::new().await;
        db.psql_ok(SHOP);
        // Until the worker has declared its queue, the broker returns the task: retried.
        let extra = "args = [\"instance.id\"]\nkwargs = { product = \"instance.product\" }\n\
                     retry = { attempts = 200, backoff = \"100ms\", max_backoff = \"500ms\" }";
        let text = format!(
            "[daemon]\nsweep_interval = \"1h\"\n[[watch]]\ntable = \"public.shop_order\"\nmode = \"durable\"\n\n{}",
            handler_table("confirm", AMQP_BROKER, &queue, extra)
        );
        let config = config(&text);
        install(&db, &config).await;
        let mut daemon = start(&db, config).await;
        db.psql_ok("INSERT INTO shop_order (user_id, product) VALUES (3, 'teapot')");
        let event = daemon.next().await;
        let worker = worker(dir.path(), AMQP_BROKER, &queue, &out);
        let call = first_line(&out, WORKER_PATIENCE, || worker.log()).await;
        let event_id = event.id.expect("a durable event");
        assert_eq!(
            call,
            json!({
                "id": format!("post-save:{}:{event_id}:confirm", db.name),
                "order_id": 1,
                "product": "teapot",
                "user": null,
                "retries": 0,
            })
        );
        daemon.stop().await;
        assert_eq!(daemon_dead_letters(&db).await, 0);
        drop(worker);
        forget_amqp_queue(&queue).await;
    }

    async fn daemon_dead_letters(db: &TestDb) -> i64 {
        db.client().await.query_one("SELECT count(*) FROM post_save.dead_letter", &[]).await.expect("query").get(0)
    }

    #[tokio::test]
    async fn a_queue_nobody_declared_is_a_failed_attempt_not_a_lost_task() {
        let queue = unique_queue("nobody");
        let toml = format!("broker = \"{AMQP_BROKER}\"\ntask = \"t\"\nqueue = \"{queue}\"\n");
        let handler = options(&toml).build("h").expect("build");
        let e = handler.handle(&sample_event(), &delivery("h", 1)).await.expect_err("unroutable");
        assert_eq!(e.failure, Failure::Failed, "{e}");
        assert!(e.message.contains("no queue"), "{e}");
    }

    #[tokio::test]
    async fn a_rabbitmq_that_is_down_is_retried() {
        let handler = options("broker = \"amqp://guest@127.0.0.1:1//\"\ntask = \"t\"\n").build("h").expect("build");
        let e = handler.handle(&sample_event(), &delivery("h", 1)).await.expect_err("down");
        assert_eq!(e.failure, Failure::Retry, "{e}");
    }
}
