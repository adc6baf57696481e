//! The django-shop example (`examples/django-shop/`) end to end, against real local services:
//! PostgreSQL, Redis on 127.0.0.1:6379, a Celery worker, an SMTP server (aiosmtpd), Django's own
//! `manage.py`, and the daemon running the example's `post-save.toml`. Orders are created four
//! ways — `Order.objects.create`, `bulk_create`, the Django admin and `psql` — and every one of
//! them gets its confirmation email, while Django's own `post_save` receiver sees only two.
//!
//! The daemon is the library's, embedded (`support::start`): the same code as `post-save run`,
//! but immune to a `post-save` binary in a shared target directory that another build made
//! without the `celery` feature.
//!
//! Then a second Django project (`tests/python/django_migrate`, same venv) runs `manage.py
//! migrate` on a watched table while its app keeps saving and `post-save run` runs (the binary:
//! its handler is a `log` one, in every build): a migration that adds, drops and renames columns
//! must fail no write and lose no save.
//!
//! Needs `python3` (the example's requirements are installed from PyPI into a private venv on
//! first use, see [`shop_venv`]) and a Redis server on 127.0.0.1:6379. The test uses a Celery
//! queue of its own, so tests running at the same time do not take each other's tasks.
#![cfg(feature = "celery")]

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde_json::Value;
use tempfile::TempDir;
use tokio_postgres::config::Host;

use crate::support;
use crate::support::db::TestDb;
use crate::support::{BinaryDaemon, config, free_port, install, observer_handlers, start, wait_for_sql};

/// The broker the example's config names; the test keeps it and picks a queue of its own.
const REDIS: &str = "redis://127.0.0.1:6379/0";
/// How long a service may take to start (a Celery worker's first start compiles its modules).
const START_PATIENCE: Duration = Duration::from_secs(60);
/// How long the emails may take: the worker's start, a retry after a refused connection, …
const MAIL_PATIENCE: Duration = Duration::from_secs(120);

/// The orders, one or two per way of saving them, each with a product of its own.
const CREATED: &str = "espresso machine";
const BULK: [&str; 2] = ["coffee grinder", "milk jug"];
const ADMIN: &str = "tamper";
const PSQL: &str = "descaler";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_order_is_confirmed_however_it_was_saved() {
    let db = TestDb::new().await;
    let queue = RedisQueue::new();
    let python = shop_venv();
    let work = TempDir::new().expect("tempdir");
    let config = example_config(&queue.name);
    let env = django_env(&db);

    // The walk-through of examples/django-shop/README.md: Django's tables, then post-save's
    // schema and trigger (`post-save migrate`, `post-save triggers install`), the SMTP server,
    // the worker and the daemon (`post-save run`).
    run_ok(manage(&python, &env, &["migrate", "--noinput"]), "manage.py migrate");
    install(&db, &config).await;
    let mut shop = Shop::start(&python, &env, &queue.name, work.path());
    let mut daemon = start(&db, config).await;
    save_orders_four_ways(&python, &shop.env, &db);

    // Every order, by product: (id, quantity).
    let client = db.client().await;
    let rows = client.query("SELECT product, id, quantity FROM shop_order", &[]).await.expect("orders");
    let orders: BTreeMap<String, (i64, i64)> =
        rows.iter().map(|r| (r.get(0), (r.get(1), i64::from(r.get::<_, i32>(2))))).collect();
    let products = [CREATED, BULK[0], BULK[1], ADMIN, PSQL];
    assert_eq!(orders.keys().map(String::as_str).collect::<Vec<_>>(), sorted(&products), "the orders saved");

    // post-save: one event per order, and one confirmation email per order, whoever saved it.
    let mut events: Vec<String> = Vec::new();
    for event in daemon.take(products.len()).await {
        assert!(event.created && event.sender == "public.shop_order", "{}", event.to_json());
        events.push(event.instance["product"].as_str().expect("product").to_owned());
    }
    events.sort_unstable();
    assert_eq!(events, sorted(&products), "the events");
    let mails = shop.wait_for_mail(products.len()).await;
    for product in products {
        assert_confirmed(&mails, product, orders[product]);
    }
    wait_for_sql(&db, "SELECT count(*) FROM post_save.event WHERE handled_at IS NULL", 0).await;
    wait_for_sql(&db, "SELECT count(*) FROM post_save.dead_letter", 0).await;
    assert_eq!(shop.mails().len(), products.len(), "no order was confirmed twice");

    // Django's own post_save: only the saves that went through Model.save().
    let rows = client
        .query("SELECT o.product, l.created FROM shop_djangosignallog l JOIN shop_order o ON o.id = l.order_id", &[])
        .await
        .expect("signal log");
    let seen: Vec<(String, bool)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    let mut seen_products: Vec<&str> = seen.iter().map(|(p, _)| p.as_str()).collect();
    seen_products.sort_unstable();
    assert_eq!(seen_products, sorted(&[CREATED, ADMIN]), "Django's post_save misses bulk_create and psql");
    assert!(seen.iter().all(|(_, created)| *created), "{seen:?}");
    daemon.stop().await;
}

/// Creates the users, then the orders: `Order.objects.create`, `bulk_create` (two), the admin and
/// `psql`, as in the example's README.
fn save_orders_four_ways(python: &Path, env: &[(String, String)], db: &TestDb) {
    let python_code = "from django.contrib.auth.models import User
User.objects.create_superuser('admin', 'admin@example.com', 'admin')
User.objects.create_user('alice', 'alice@example.com', 'alice')";
    run_ok(manage(python, env, &["shell", "-c", python_code]), "creating the users");

    // 1. Order.objects.create: Django sends post_save.
    let create = format!(
        "from django.contrib.auth.models import User
from shop.models import Order
Order.objects.create(user=User.objects.get(username='alice'), product='{CREATED}', quantity=1)"
    );
    run_ok(manage(python, env, &["shell", "-c", &create]), "Order.objects.create");
    // 2. bulk_create: one INSERT of two rows, no post_save.
    let bulk = format!(
        "from django.contrib.auth.models import User
from shop.models import Order
alice = User.objects.get(username='alice')
Order.objects.bulk_create([Order(user=alice, product='{}', quantity=2), Order(user=alice, product='{}', quantity=1)])",
        BULK[0], BULK[1]
    );
    run_ok(manage(python, env, &["shell", "-c", &bulk]), "Order.objects.bulk_create");
    // 3. The admin's add form, posted by a logged-in superuser: Django sends post_save.
    let admin = format!(
        "from django.contrib.auth.models import User
from django.test import Client
client = Client(SERVER_NAME='localhost')
client.force_login(User.objects.get(username='admin'))
alice = User.objects.get(username='alice')
response = client.post('/admin/shop/order/add/', {{'user': alice.pk, 'product': '{ADMIN}', 'quantity': 3}})
if response.status_code != 302:
    raise SystemExit(f'the admin did not save the order ({{response.status_code}}):\\n{{response.content.decode()}}')"
    );
    run_ok(manage(python, env, &["shell", "-c", &admin]), "the admin's add view");
    // 4. psql: no Django at all.
    db.psql_ok(&format!(
        "INSERT INTO shop_order (user_id, product, quantity) SELECT id, '{PSQL}', 4 FROM auth_user WHERE username = 'alice'"
    ));
}

/// Exactly one of `mails` confirms the order of `product`, to its customer.
fn assert_confirmed(mails: &[String], product: &str, (id, quantity): (i64, i64)) {
    let confirmations: Vec<&String> =
        mails.iter().filter(|m| m.contains(&format!(": {quantity} x {product}."))).collect();
    assert_eq!(confirmations.len(), 1, "one confirmation for {product}, got:\n{}", mails.join("\n----\n"));
    let mail = confirmations[0];
    assert!(mail.contains(&format!("Subject: Order #{id} confirmed")), "{mail}");
    assert!(mail.contains("To: alice@example.com"), "{mail}");
    assert!(mail.contains(&format!("thank you for your order #{id}: ")), "{mail}");
}

fn sorted<'a>(items: &[&'a str]) -> Vec<&'a str> {
    let mut items = items.to_vec();
    items.sort_unstable();
    items
}

/// examples/django-shop.
fn example_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/django-shop")
}

/// The example's `post-save.toml` with the test's queue.
fn example_config(queue: &str) -> post_save::Config {
    let text = std::fs::read_to_string(example_dir().join("post-save.toml")).expect("reading post-save.toml");
    let line = "queue = \"celery\"";
    assert_eq!(text.matches(line).count(), 1, "post-save.toml should have one `{line}`");
    assert!(text.contains(&format!("broker = \"{REDIS}\"")), "post-save.toml should use the broker {REDIS}");
    config(&text.replace(line, &format!("queue = \"{queue}\"")))
}

/// The test database as libpq's variables, which the example's settings read (as its README
/// sets them).
fn django_env(db: &TestDb) -> Vec<(String, String)> {
    let config = tokio_postgres::Config::from_str(&db.conninfo).expect("conninfo");
    let host = match config.get_hosts().first() {
        Some(Host::Tcp(name)) => name.clone(),
        Some(Host::Unix(path)) => path.to_string_lossy().into_owned(),
        None => "localhost".to_owned(),
    };
    let mut env = vec![
        ("PGHOST".to_owned(), host),
        ("PGPORT".to_owned(), config.get_ports().first().copied().unwrap_or(5432).to_string()),
        ("PGDATABASE".to_owned(), db.name.clone()),
        ("PGUSER".to_owned(), config.get_user().unwrap_or("postgres").to_owned()),
        ("CELERY_BROKER_URL".to_owned(), REDIS.to_owned()),
    ];
    if let Some(password) = config.get_password() {
        env.push(("PGPASSWORD".to_owned(), String::from_utf8_lossy(password).into_owned()));
    }
    env
}

/// `python manage.py <args>` in the example's directory.
fn manage(python: &Path, env: &[(String, String)], args: &[&str]) -> Command {
    let mut command = python_command(python, env);
    command.arg("manage.py").args(args);
    command
}

/// The venv's Python in the example's directory, with `env` and nothing of the caller's database
/// settings.
fn python_command(python: &Path, env: &[(String, String)]) -> Command {
    python_in(&example_dir(), python, env)
}

/// The venv's Python in `dir`, with `env` and nothing of the caller's database settings.
fn python_in(dir: &Path, python: &Path, env: &[(String, String)]) -> Command {
    let mut command = Command::new(python);
    command
        .current_dir(dir)
        .env_remove("DATABASE_URL")
        .env_remove("PGPASSWORD")
        .env_remove("PGSERVICE")
        .env_remove("DJANGO_SETTINGS_MODULE")
        .env("PYTHONUNBUFFERED", "1")
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .envs(env.iter().map(|(k, v)| (k, v)));
    command
}

/// Runs `command`, panics with its output unless it succeeds, and returns its stdout.
fn run_ok(mut command: Command, what: &str) -> String {
    let out = command.stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("could not run {what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The running services: a Celery worker and an SMTP server. Dropping it stops them, the worker
/// first.
struct Shop {
    worker: Service,
    smtp: Service,
    /// The Django environment with the SMTP server's address.
    env: Vec<(String, String)>,
    maildir: PathBuf,
}

impl Shop {
    fn start(python: &Path, env: &[(String, String)], queue: &str, work: &Path) -> Shop {
        let maildir = work.join("mail");
        let port = free_port();
        let mut command = python_command(python, env);
        command.args(["-m", "aiosmtpd", "-n", "-l", &format!("127.0.0.1:{port}"), "-c", "aiosmtpd.handlers.Mailbox"]);
        command.arg(&maildir);
        let mut smtp = Service::spawn("smtp", command, work);
        smtp.wait_for_port(port);

        let mut env = env.to_vec();
        env.extend([("EMAIL_HOST".to_owned(), "127.0.0.1".to_owned()), ("EMAIL_PORT".to_owned(), port.to_string())]);
        let mut command = python_command(python, &env);
        command.args(["-m", "celery", "-A", "shopsite", "worker", "--pool", "solo", "--loglevel", "INFO"]);
        command.args(["-Q", queue, "-n", &format!("{queue}@%h")]);
        command.args(["--without-mingle", "--without-gossip", "--without-heartbeat"]);
        let mut worker = Service::spawn("celery worker", command, work);
        worker.wait_for_line(|line| line.contains(" ready."));
        Shop { worker, smtp, env, maildir }
    }

    /// Every message in the mailbox so far.
    fn mails(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(self.maildir.join("new")) else { return Vec::new() };
        entries.map(|entry| std::fs::read_to_string(entry.expect("maildir entry").path()).expect("a mail")).collect()
    }

    /// Waits until the mailbox holds `n` messages, checking that every service keeps running.
    async fn wait_for_mail(&mut self, n: usize) -> Vec<String> {
        let deadline = Instant::now() + MAIL_PATIENCE;
        loop {
            let mails = self.mails();
            if mails.len() >= n {
                return mails;
            }
            for service in [&mut self.worker, &mut self.smtp] {
                service.assert_running();
            }
            assert!(
                Instant::now() < deadline,
                "{} of {n} emails after {MAIL_PATIENCE:?}\n{}",
                mails.len(),
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn logs(&self) -> String {
        [&self.worker, &self.smtp].iter().map(|s| s.tail()).collect::<Vec<_>>().join("\n")
    }
}

/// A child process in a process group of its own with its output in a log file. Dropping it
/// stops the whole group (SIGTERM, then SIGKILL), also when the test fails.
struct Service {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Service {
    fn spawn(name: &'static str, mut command: Command, logs: &Path) -> Service {
        let log = logs.join(format!("{}.log", name.replace(' ', "-")));
        let file = File::create(&log).expect("creating a log file");
        let child = command
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log file"))
            .stderr(file)
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("could not start {name}: {e}"));
        Service { name, child, log }
    }

    /// The last lines of the log, for a failure message.
    fn tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let last = lines[lines.len().saturating_sub(40)..].join("\n");
        format!("--- {} ({})\n{last}", self.name, self.log.display())
    }

    /// Panics, with the log, when the process has exited.
    fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().expect("try_wait") {
            panic!("{} exited ({status})\n{}", self.name, self.tail());
        }
    }

    /// Waits until a line of the log satisfies `ready`.
    fn wait_for_line(&mut self, ready: impl Fn(&str) -> bool) {
        let deadline = Instant::now() + START_PATIENCE;
        loop {
            if std::fs::read_to_string(&self.log).unwrap_or_default().lines().any(&ready) {
                return;
            }
            self.assert_running();
            assert!(
                Instant::now() < deadline,
                "{} did not start within {START_PATIENCE:?}\n{}",
                self.name,
                self.tail()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until 127.0.0.1:`port` accepts connections.
    fn wait_for_port(&mut self, port: u16) {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let deadline = Instant::now() + START_PATIENCE;
        while TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err() {
            self.assert_running();
            assert!(
                Instant::now() < deadline,
                "{} did not listen within {START_PATIENCE:?}\n{}",
                self.name,
                self.tail()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let Ok(pid) = i32::try_from(self.child.id()) else { return };
        let group = Pid::from_raw(pid);
        let _ = killpg(group, Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        // Whatever of the group is left (a worker's child, a stuck leader).
        let _ = killpg(group, Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

/// A Celery queue of the test's own on the broker; its keys are deleted when this is dropped.
struct RedisQueue {
    name: String,
    client: redis::Client,
}

impl RedisQueue {
    /// Checks that the broker answers, and picks a name no other test uses.
    fn new() -> RedisQueue {
        let client = redis::Client::open(REDIS).expect("redis url");
        let pong = client.get_connection().and_then(|mut con| redis::cmd("PING").query::<String>(&mut con));
        if let Err(e) = pong {
            panic!("this test needs a Redis server at {REDIS} (apt-get install redis-server): {e}");
        }
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        RedisQueue { name: format!("post-save-django-shop-{}-{nanos:x}", std::process::id()), client }
    }
}

impl Drop for RedisQueue {
    /// The queue's lists (kombu keeps one per priority step) and the worker's bindings.
    fn drop(&mut self) {
        let name = &self.name;
        let mut keys = vec![name.clone(), format!("_kombu.binding.{name}"), format!("_kombu.binding_permanent.{name}")];
        keys.extend(["3", "6", "9"].map(|step| format!("{name}\x06\x16{step}")));
        if let Ok(mut con) = self.client.get_connection() {
            let _ = redis::cmd("DEL").arg(&keys).query::<i64>(&mut con);
        }
    }
}

/// The Python of a private virtualenv with `examples/django-shop/requirements.txt` installed
/// (PyPI), created on first use and shared by every test process: `$POST_SAVE_DJANGO_SHOP_VENV`,
/// else `$TMPDIR/post-save-django-shop-venv-<uid>`. As `support::db::python_venv`: a file lock keeps
/// concurrent test processes from installing at the same time, and a stamp holding the
/// requirements makes later calls instant.
fn shop_venv() -> PathBuf {
    static VENV: OnceLock<PathBuf> = OnceLock::new();
    VENV.get_or_init(|| {
        let requirements = example_dir().join("requirements.txt");
        let wanted = std::fs::read_to_string(&requirements).expect("reading examples/django-shop/requirements.txt");
        let dir = std::env::var_os("POST_SAVE_DJANGO_SHOP_VENV").map(PathBuf::from).unwrap_or_else(|| {
            std::env::temp_dir().join(format!("post-save-django-shop-venv-{}", nix::unistd::getuid()))
        });
        let python = dir.join("bin/python");
        let stamp = dir.join("post-save-requirements.txt");
        if std::fs::read_to_string(&stamp).ok().as_deref() == Some(wanted.as_str()) {
            return python;
        }
        std::fs::create_dir_all(dir.parent().unwrap_or(&dir)).expect("creating the venv's parent");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.with_extension("lock"))
            .expect("opening the venv lock");
        let lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| e)
            .expect("locking the venv");
        if std::fs::read_to_string(&stamp).ok().as_deref() != Some(wanted.as_str()) {
            if !python.exists() {
                let mut venv = Command::new("python3");
                venv.args(["-m", "venv"]).arg(&dir);
                run_ok(venv, "python3 -m venv");
            }
            let mut pip = Command::new(&python);
            pip.args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "-r"]).arg(&requirements);
            run_ok(pip, "pip install -r examples/django-shop/requirements.txt");
            std::fs::write(&stamp, &wanted).expect("writing the venv stamp");
        }
        drop(lock);
        python
    })
    .clone()
}

// ---------------------------------------------------------------------------------------------
// `manage.py migrate` reshaping the watched table while the app keeps saving (issue 22).
// ---------------------------------------------------------------------------------------------

/// tests/python/django_migrate: a Django project whose migration `0002_reshape` adds, drops and
/// renames a column of the watched table `public.catalog_item`, and `saver.py`, the app that
/// keeps saving while it runs.
fn migrate_project() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/django_migrate")
}

/// Saves the app makes before the migration starts, and again after it is over, before the test
/// moves on: enough rounds that each kind of save runs through the capture in both shapes.
const SAVES_PER_PHASE: usize = 60;

/// The columns of `catalog_item` before and after `0002_reshape`.
const BEFORE: [&str; 5] = ["coupon", "id", "legacy_code", "name", "stock"];
const AFTER: [&str; 5] = ["id", "name", "note", "promo_code", "stock"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manage_py_migrate_while_the_app_saves_fails_no_write_and_loses_no_save_durable() {
    migrate_while_saving("durable").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manage_py_migrate_while_the_app_saves_fails_no_write_and_loses_no_save_notify() {
    migrate_while_saving("notify").await;
}

/// The daemon (the real binary) runs and the app keeps saving through the ORM, Model.save() and
/// QuerySet.update(), while `manage.py migrate` adds, drops and renames columns of the watched
/// table: no save fails, and every save reaches the handler once, in the table's shape of its
/// time.
async fn migrate_while_saving(mode: &str) {
    let db = TestDb::new().await;
    let python = shop_venv();
    let env = django_env(&db);
    let project = migrate_project();
    let manage = |args: &[&str]| {
        let mut command = python_in(&project, &python, &env);
        command.arg("manage.py").args(args);
        command
    };
    run_ok(manage(&["migrate", "catalog", "0001", "--noinput"]), "manage.py migrate catalog 0001");
    let config = format!("[[watch]]\ntable = \"public.catalog_item\"\nmode = \"{mode}\"\n{}", observer_handlers(false));
    let mut daemon = BinaryDaemon::install_and_start(&db, &config).await;

    let work = TempDir::new().expect("tempdir");
    let mut saver = Saver::start(python_in(&project, &python, &env), work.path());
    saver.wait_for("saves before the migration", |s| s.count("before") >= SAVES_PER_PHASE).await;
    std::fs::write(work.path().join("migrating"), "").expect("writing the phase file");
    let migrate = manage(&["migrate", "catalog", "--noinput"]);
    let out = tokio::task::spawn_blocking(move || run_ok(migrate, "manage.py migrate catalog"))
        .await
        .expect("manage.py migrate panicked");
    assert!(out.contains("Applying catalog.0002_reshape... OK"), "{out}");
    std::fs::write(work.path().join("migrated"), "").expect("writing the phase file");
    saver.wait_for("saves after the migration", |s| s.count("after") >= SAVES_PER_PHASE).await;
    let saves = saver.stop().await;

    let failed: Vec<&Value> = saves.iter().filter(|s| !s["error"].is_null()).collect();
    assert!(
        failed.is_empty(),
        "{} of {} saves failed; the first ones:\n{}",
        failed.len(),
        saves.len(),
        failed.iter().take(5).map(|s| s.to_string()).collect::<Vec<_>>().join("\n")
    );

    // Every save's event, by the marker in `name`, each once.
    let phases: HashMap<&str, &str> =
        saves.iter().map(|s| (s["marker"].as_str().expect("marker"), s["phase"].as_str().expect("phase"))).collect();
    assert_eq!(phases.len(), saves.len(), "saver.py reused a marker");
    let mut events: HashMap<String, Vec<Value>> = HashMap::new();
    let deadline = tokio::time::Instant::now() + support::PATIENCE;
    while events.len() < phases.len() {
        let Some(event) = daemon.next_before(deadline).await else {
            let mut missing: Vec<&&str> = phases.keys().filter(|m| !events.contains_key(**m)).collect();
            missing.sort_unstable();
            panic!(
                "{} of {} saves reached the handler; missing: {:?}…\nthe daemon's log:\n{}",
                events.len(),
                phases.len(),
                &missing[..missing.len().min(20)],
                daemon.log_text()
            );
        };
        let marker = event["instance"]["name"].as_str().expect("a name").to_owned();
        events.entry(marker).or_default().push(event);
    }
    for event in daemon.drain() {
        events.entry(event["instance"]["name"].as_str().expect("a name").to_owned()).or_default().push(event);
    }
    for (marker, seen) in &events {
        assert!(phases.contains_key(marker.as_str()), "an event no save made: {}", seen[0]);
        assert_eq!(seen.len(), 1, "{marker} handled {} times: {seen:?}", seen.len());
        assert_save_event(marker, phases[marker.as_str()], &seen[0]);
    }
    daemon.stop().await;
}

/// The event of the save `marker` (`create-N`, `save-N` or `update-N`) made in `phase`: its
/// operation, its changed columns and, but for saves made during the migration, the columns
/// of the table's shape at the time.
fn assert_save_event(marker: &str, phase: &str, event: &Value) {
    let kind = marker.split('-').next().unwrap_or_default();
    let (op, fields) = match kind {
        "create" => ("insert", Value::Null),
        "save" => ("update", serde_json::json!(["name", "stock"])),
        _ => ("update", serde_json::json!(["name"])),
    };
    assert_eq!((event["op"].as_str(), &event["update_fields"]), (Some(op), &fields), "{marker}: {event}");
    let mut columns: Vec<&str> =
        event["instance"].as_object().expect("an instance").keys().map(String::as_str).collect();
    columns.sort_unstable();
    match phase {
        "before" => assert_eq!(columns, BEFORE, "{marker}, saved before the migration: {event}"),
        "after" => assert_eq!(columns, AFTER, "{marker}, saved after the migration: {event}"),
        _ => assert!(columns == BEFORE || columns == AFTER, "{marker}, saved during the migration: {event}"),
    }
}

/// `saver.py` running (see its docstring), and the saves it has reported so far. Dropping it
/// kills the process.
struct Saver {
    child: Child,
    reports: tokio::sync::mpsc::UnboundedReceiver<Value>,
    saves: Vec<Value>,
    work: PathBuf,
}

impl Saver {
    /// Starts `python saver.py <work>`; its stderr goes to `<work>/saver.log`.
    fn start(mut command: Command, work: &Path) -> Saver {
        let log = File::create(work.join("saver.log")).expect("creating saver.log");
        let mut child = command
            .arg("saver.py")
            .arg(work)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("could not start saver.py");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, reports) = tokio::sync::mpsc::unbounded_channel();
        // A thread: the reports must be read while the test's runtime waits on manage.py.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let report = serde_json::from_str(&line).unwrap_or_else(|_| serde_json::json!({ "unreadable": line }));
                if tx.send(report).is_err() {
                    return;
                }
            }
        });
        Saver { child, reports, saves: Vec::new(), work: work.to_owned() }
    }

    /// The saves reported so far that began in `phase`.
    fn count(&self, phase: &str) -> usize {
        self.saves.iter().filter(|s| s["phase"] == phase).count()
    }

    /// Takes reports until `done` holds, or panics after [`START_PATIENCE`].
    async fn wait_for(&mut self, what: &str, done: impl Fn(&Saver) -> bool) {
        let deadline = tokio::time::Instant::now() + START_PATIENCE;
        while !done(self) {
            match tokio::time::timeout_at(deadline, self.reports.recv()).await {
                Ok(Some(report)) if report.get("unreadable").is_none() => self.saves.push(report),
                Ok(Some(report)) => {
                    panic!("saver.py printed {report} while the test waited for {what}\n{}", self.tail())
                }
                Ok(None) => panic!("saver.py exited while the test waited for {what}\n{}", self.tail()),
                Err(_) => panic!("{what}: {} saves after {START_PATIENCE:?}\n{}", self.saves.len(), self.tail()),
            }
        }
    }

    /// Tells it to stop, waits for its last report and its exit, and returns every save.
    async fn stop(mut self) -> Vec<Value> {
        std::fs::write(self.work.join("stop"), "").expect("writing the stop file");
        self.wait_for("saver.py to stop", |s| s.saves.last().is_some_and(|r| r.get("done").is_some())).await;
        let done = self.saves.pop();
        assert_eq!(done, Some(serde_json::json!({ "done": true })));
        let status = self.child.wait().expect("waiting for saver.py");
        assert!(status.success(), "saver.py exited {status}\n{}", self.tail());
        std::mem::take(&mut self.saves)
    }

    /// The end of its stderr, for a failure message.
    fn tail(&self) -> String {
        let text = std::fs::read_to_string(self.work.join("saver.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        format!("--- saver.py's stderr\n{}", lines[lines.len().saturating_sub(40)..].join("\n"))
    }
}

impl Drop for Saver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
