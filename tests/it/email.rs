//! `kind = "email"` against a real SMTP server (aiosmtpd from the test venv, see
//! `support::db::python_venv`): a save made with psql mails the address in the row; a template over
//! a missing field or an invalid address is a dead letter at once; a 4xx reply is retried and a
//! 5xx is not; a server that is down at first gets the mail once it is up; `handlers list`
//! shows the server without the password.
#![cfg(feature = "email")]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde_json::Value;
use tempfile::TempDir;

use crate::support::child::binary;
use crate::support::db::{TestDb, python_venv};
use crate::support::{PATIENCE, Running, config, free_port, install, start, wait_for_sql};

const SHOP: &str = "CREATE TABLE customer_order (
    id bigserial PRIMARY KEY, email text NOT NULL, product text NOT NULL)";

/// An SMTP server that writes each accepted mail to `<out>/<n>.json` (envelope and data).
/// Recipients named `reject…@` get a 550; `busy…@` get a 451 on their first two tries.
const SINK: &str = r#"
import json, os, sys, time
from aiosmtpd.controller import Controller

port, out = int(sys.argv[1]), sys.argv[2]
tries = {}

class Sink:
    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        local = address.split("@")[0]
        if local.startswith("reject"):
            return "550 5.1.1 no such user"
        if local.startswith("busy"):
            tries[address] = tries.get(address, 0) + 1
            if tries[address] <= 2:
                return "451 4.3.0 try again later"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        path = os.path.join(out, "%d.json" % time.time_ns())
        with open(path + ".tmp", "w") as f:
            json.dump({"from": envelope.mail_from, "to": envelope.rcpt_tos,
                       "data": envelope.content.decode("utf-8", "replace")}, f)
        os.rename(path + ".tmp", path)
        return "250 Message accepted for delivery"

controller = Controller(Sink(), hostname="127.0.0.1", port=port)
controller.start()
print("ready", flush=True)
while True:
    time.sleep(3600)
"#;

/// A child process in a process group of its own, killed (group and all) when dropped.
struct Peer {
    child: Child,
    log: PathBuf,
}

impl Drop for Peer {
    fn drop(&mut self) {
        let Ok(pid) = i32::try_from(self.child.id()) else { return };
        let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

/// A mail server on 127.0.0.1:`port` writing into `dir/mail`; returns once it accepts
/// connections.
async fn smtp_sink(dir: &Path, port: u16) -> Peer {
    use std::os::unix::process::CommandExt as _;
    let script = dir.join("sink.py");
    std::fs::write(&script, SINK).expect("write sink.py");
    std::fs::create_dir_all(dir.join("mail")).expect("mkdir mail");
    let log = dir.join("sink.log");
    let log_file = std::fs::File::create(&log).expect("sink log");
    let child = Command::new(python_venv())
        .arg(&script)
        .arg(port.to_string())
        .arg(dir.join("mail"))
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().expect("dup log"))
        .stderr(log_file)
        .process_group(0)
        .spawn()
        .expect("could not start the SMTP server");
    let mut peer = Peer { child, log };
    let deadline = Instant::now() + PATIENCE;
    while !std::fs::read_to_string(&peer.log).unwrap_or_default().contains("ready") {
        let exited = peer.child.try_wait().ok().flatten();
        let log = std::fs::read_to_string(&peer.log).unwrap_or_default();
        assert!(exited.is_none(), "the SMTP server exited ({exited:?}):\n{log}");
        assert!(Instant::now() < deadline, "the SMTP server did not start:\n{log}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    peer
}

/// The mails received so far, oldest first.
fn mails(dir: &Path) -> Vec<Value> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir.join("mail"))
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    paths.retain(|p| p.extension().is_some_and(|e| e == "json"));
    paths.sort();
    paths.iter().map(|p| serde_json::from_str(&std::fs::read_to_string(p).expect("read mail")).expect("JSON")).collect()
}

/// Waits for `n` mails.
async fn wait_for_mails(dir: &Path, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let got = mails(dir);
        if got.len() >= n {
            return got;
        }
        let log = std::fs::read_to_string(dir.join("sink.log")).unwrap_or_default();
        assert!(Instant::now() < deadline, "got {} of {n} mails; server log:\n{log}", got.len());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A `[[handler]]` of kind email to the server on `port`; `extra` adds or overrides keys.
fn mail_handler(name: &str, port: u16, extra: &str) -> String {
    format!(
        "[[handler]]\nname = \"{name}\"\nsender = \"public.customer_order\"\nkind = \"email\"\n\
         smtp = \"smtp://127.0.0.1:{port}\"\nfrom = \"Shop <shop@example.com>\"\n{extra}\n"
    )
}

const NEW_ORDER: &str = "to = [\"{{ instance.email }}\"]\ncc = [\"audit@example.com\"]\n\
    subject = \"New order for {{ instance.product }}\"\n\
    body = \"\"\"\nOrder {{ instance.id }}: {{ instance.product }}\nThanks!\n\"\"\"\n";

async fn shop_with(handlers: &str) -> (TestDb, Running) {
    let db = TestDb::new().await;
    db.psql_ok(SHOP);
    let text = format!(
        "[daemon]\nsweep_interval = \"1h\"\n[[watch]]\ntable = \"public.customer_order\"\nmode = \"durable\"\n\n{handlers}"
    );
    let config = config(&text);
    install(&db, &config).await;
    let daemon = start(&db, config).await;
    (db, daemon)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_psql_insert_mails_the_address_in_the_row() {
    let dir = TempDir::new().expect("tempdir");
    let port = free_port();
    let _sink = smtp_sink(dir.path(), port).await;
    let (db, mut daemon) = shop_with(&mail_handler("mail", port, NEW_ORDER)).await;

    db.psql_ok("INSERT INTO customer_order (email, product) VALUES ('alice@example.com', 'espresso machine')");
    let event = daemon.next().await;
    let mail = wait_for_mails(dir.path(), 1).await.remove(0);
    assert_eq!(mail["from"], "shop@example.com");
    let mut to: Vec<&str> = mail["to"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
    to.sort_unstable();
    assert_eq!(to, ["alice@example.com", "audit@example.com"]);
    let data = mail["data"].as_str().unwrap().replace("\r\n", "\n");
    let (headers, body) = data.split_once("\n\n").expect("headers and body");
    assert!(headers.contains("\nSubject: New order for espresso machine\n"), "{headers}");
    assert!(headers.contains("From: Shop <shop@example.com>"), "{headers}");
    assert!(headers.contains("To: alice@example.com"), "{headers}");
    assert!(headers.contains("Cc: audit@example.com"), "{headers}");
    assert!(headers.contains("Content-Type: text/plain; charset=utf-8"), "{headers}");
    let id = event.id.expect("a durable event");
    let message_id = format!("Message-ID: <post-save.{}.{id}.mail@", db.name);
    assert!(headers.contains(&message_id), "{headers}");
    // The SMTP DATA terminator adds a line end of its own.
    assert_eq!(body.trim_end(), "Order 1: espresso machine\nThanks!");
    daemon.stop().await;
    assert_eq!(db.query_i64("SELECT count(*) FROM post_save.dead_letter").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_field_or_a_bad_address_is_a_dead_letter_at_once() {
    let dir = TempDir::new().expect("tempdir");
    let port = free_port();
    let _sink = smtp_sink(dir.path(), port).await;
    let retry = "retry = { attempts = 5, backoff = \"20ms\", max_backoff = \"50ms\" }\n";
    let missing = format!("to = \"ops@example.com\"\nsubject = \"{{{{ instance.nope }}}}\"\nbody = \"x\"\n{retry}");
    let address = format!("to = [\"{{{{ instance.email }}}}\"]\nsubject = \"s\"\nbody = \"x\"\n{retry}");
    let handlers = format!("{}{}", mail_handler("missing", port, &missing), mail_handler("address", port, &address));
    let (db, mut daemon) = shop_with(&handlers).await;

    db.psql_ok("INSERT INTO customer_order (email, product) VALUES ('not an address', 'book')");
    daemon.next().await;
    wait_for_sql(&db, "SELECT count(*) FROM post_save.dead_letter", 2).await;
    let client = db.client().await;
    let rows = client
        .query("SELECT handler, attempts, last_error FROM post_save.dead_letter ORDER BY handler", &[])
        .await
        .expect("dead letters");
    let dead: Vec<(String, i32, String)> = rows.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect();
    assert_eq!((dead[0].0.as_str(), dead[0].1), ("address", 1), "{dead:?}");
    assert!(dead[0].2.contains("invalid address `not an address`"), "{dead:?}");
    assert_eq!((dead[1].0.as_str(), dead[1].1), ("missing", 1), "{dead:?}");
    assert!(dead[1].2.contains("email subject") && dead[1].2.contains("instance.nope"), "{dead:?}");
    assert_eq!(daemon.stats.snapshot().failed_attempts, 2, "no retries");
    daemon.stop().await;
    assert!(mails(dir.path()).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_smtp_4xx_is_retried_and_a_5xx_is_dead() {
    let dir = TempDir::new().expect("tempdir");
    let port = free_port();
    let _sink = smtp_sink(dir.path(), port).await;
    let extra = format!("{NEW_ORDER}retry = {{ attempts = 5, backoff = \"20ms\", max_backoff = \"50ms\" }}\n");
    let (db, mut daemon) =
        shop_with(&mail_handler("mail", port, &extra.replace("cc = [\"audit@example.com\"]\n", ""))).await;

    db.psql_ok("INSERT INTO customer_order (email, product) VALUES ('busy@example.com', 'tea'), ('reject@example.com', 'cake')");
    daemon.take(2).await;
    let mail = wait_for_mails(dir.path(), 1).await.remove(0);
    assert_eq!(mail["to"], serde_json::json!(["busy@example.com"]));
    wait_for_sql(&db, "SELECT count(*) FROM post_save.dead_letter", 1).await;
    let (attempts, error): (i32, String) = {
        let row = db.client().await.query_one("SELECT attempts, last_error FROM post_save.dead_letter", &[]).await;
        let row = row.expect("one dead letter");
        (row.get(0), row.get(1))
    };
    assert_eq!(attempts, 1, "a 5xx is not retried: {error}");
    assert!(error.contains("550") || error.contains("no such user"), "{error}");
    wait_for_sql(&db, "SELECT count(*) FROM post_save.event WHERE handled_at IS NULL", 0).await;
    // busy@: two 451s, then delivered; reject@: one 550.
    assert_eq!(daemon.stats.snapshot().failed_attempts, 3);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_is_down_at_first_gets_the_mail_once_it_is_up() {
    let dir = TempDir::new().expect("tempdir");
    let port = free_port();
    let extra = format!("{NEW_ORDER}retry = {{ attempts = 50, backoff = \"50ms\", max_backoff = \"200ms\" }}\n");
    let (db, mut daemon) = shop_with(&mail_handler("mail", port, &extra)).await;

    db.psql_ok("INSERT INTO customer_order (email, product) VALUES ('bob@example.com', 'kettle')");
    daemon.next().await;
    let deadline = Instant::now() + PATIENCE;
    while daemon.stats.snapshot().failed_attempts < 2 {
        assert!(Instant::now() < deadline, "no failed attempt while the server is down");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _sink = smtp_sink(dir.path(), port).await;
    let mail = wait_for_mails(dir.path(), 1).await.remove(0);
    assert!(mail["data"].as_str().unwrap().contains("Subject: New order for kettle"));
    wait_for_sql(&db, "SELECT count(*) FROM post_save.event WHERE handled_at IS NULL", 0).await;
    assert_eq!(db.query_i64("SELECT count(*) FROM post_save.dead_letter").await, 0);
    daemon.stop().await;
}

fn post_save(config: &Path, args: &[&str]) -> std::process::Output {
    assert_cmd::Command::from_std(binary())
        .args(["--config", config.to_str().unwrap(), "--database-url", "host=/nonexistent"])
        .args(args)
        .env("EMAIL_TEST_SMTP_PASSWORD", "hunter2")
        .timeout(PATIENCE)
        .output()
        .expect("run post-save")
}

const LISTED: &str = "[[watch]]\ntable = \"public.customer_order\"\n\n[[handler]]\nname = \"mail\"\nkind = \"email\"\n\
    smtp = \"SMTP\"\nusername = \"orders\"\npassword_env = \"EMAIL_TEST_SMTP_PASSWORD\"\n\
    from = \"shop@example.com\"\nto = [\"a@x.example\", \"{{ instance.email }}\"]\nsubject = \"s\"\nbody = \"b\"\n";

#[test]
fn handlers_list_shows_the_server_without_the_password() {
    let dir = TempDir::new().expect("tempdir");
    let path = dir.path().join("email.toml");
    std::fs::write(&path, LISTED.replace("SMTP", "smtp://mail.example:2525?tls=required")).expect("write config");
    let out = post_save(&path, &["handlers", "list", "--json"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    let list: Value = serde_json::from_str(&stdout).expect("JSON");
    assert_eq!(list[0]["kind"], "email");
    assert_eq!(list[0]["target"], "smtp://mail.example:2525?tls=required to a@x.example, {{ instance.email }}");
    assert!(!stdout.contains("hunter2"));
}

#[test]
fn a_password_in_the_smtp_url_is_a_config_error_that_does_not_show_it() {
    let dir = TempDir::new().expect("tempdir");
    let path = dir.path().join("email.toml");
    std::fs::write(&path, LISTED.replace("SMTP", "smtps://orders:hunter2@mail.example")).expect("write config");
    let out = post_save(&path, &["config", "check"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{stderr}");
    assert!(stderr.contains("handler[0].smtp") && stderr.contains("password_env"), "{stderr}");
    assert!(!stderr.contains("hunter2"), "{stderr}");
}

#[test]
fn bad_options_are_config_errors() {
    use post_save::config::Section;
    use post_save::testing::kinds::EmailOptions;
    let base = "smtp = \"smtp://127.0.0.1:2525\"\nfrom = \"a@x.example\"\nto = \"b@x.example\"\nsubject = \"s\"\nbody = \"b\"\n";
    for (change, needle) in [
        (("from = \"a@x.example\"", "from = \"nobody\""), "invalid address"),
        (("to = \"b@x.example\"", "to = []"), "at least one recipient"),
        (("subject = \"s\"", "subject = \"{{ instanse.x }}\""), "instanse"),
        (("body = \"b\"", "body = \"{% if %}\""), "body"),
        (("body = \"b\"", "body = \"b\"\npassword_env = \"P\""), "needs a `username`"),
        (("smtp = \"smtp://127.0.0.1:2525\"", "smtp = \"imap://h\""), "unknown scheme"),
        (("subject = \"s\"\n", ""), "subject"),
    ] {
        let toml = base.replace(change.0, change.1);
        let mut section = Section::from_document(&toml, "handler[0]").expect("toml");
        let e = EmailOptions::parse(&mut section).expect_err(&toml).to_string();
        assert!(e.contains(needle), "{toml}: {e}");
    }
}
