//! The `post-save` command line, run as a real process: exit codes, configuration errors naming
//! key and line, `handlers list`, the `triggers` commands, `migrate`, an unreachable database and
//! `--help`.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::child::binary;
use crate::support::db::TestDb;

/// The longest any command here may run; each finishes in well under a second normally.
const PATIENCE: Duration = Duration::from_secs(60);

/// A server nothing listens on: connecting fails at once (connection refused).
const UNREACHABLE: &str = "host=127.0.0.1 port=1 connect_timeout=2";

/// The table of the issue.
const SHOP_ORDER: &str = "CREATE TABLE shop_order (id bigserial PRIMARY KEY, user_id bigint NOT NULL, \
     product text NOT NULL, quantity integer NOT NULL DEFAULT 1, created_at timestamptz NOT NULL DEFAULT now())";

/// What a finished command left behind.
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
    what: String,
}

impl Run {
    fn from_output(what: String, out: Output) -> Run {
        let code = out.status.code().unwrap_or_else(|| panic!("{what} was killed by a signal: {}", out.status));
        Run {
            code,
            stdout: String::from_utf8(out.stdout).expect("stdout is UTF-8"),
            stderr: String::from_utf8(out.stderr).expect("stderr is UTF-8"),
            what,
        }
    }

    /// Asserts the exit code, showing both streams when it differs.
    #[track_caller]
    fn code(&self, want: i32) -> &Run {
        assert_eq!(
            self.code, want,
            "{}: exit code {} (want {want})\n--- stdout\n{}--- stderr\n{}",
            self.what, self.code, self.stdout, self.stderr
        );
        self
    }

    #[track_caller]
    fn stderr_has(&self, needle: &str) -> &Run {
        assert!(self.stderr.contains(needle), "{}: stderr lacks {needle:?}:\n{}", self.what, self.stderr);
        self
    }

    #[track_caller]
    fn stdout_has(&self, needle: &str) -> &Run {
        assert!(self.stdout.contains(needle), "{}: stdout lacks {needle:?}:\n{}", self.what, self.stdout);
        self
    }
}

/// A `post-save` command with a clean environment and a deadline.
fn command(args: &[&str]) -> assert_cmd::Command {
    let mut cmd = assert_cmd::Command::from_std(binary());
    cmd.args(args).timeout(PATIENCE);
    cmd
}

/// Runs `post-save <args>` to completion.
fn post_save(args: &[&str]) -> Run {
    let out = command(args).output().expect("could not run post-save");
    Run::from_output(format!("post-save {}", args.join(" ")), out)
}

/// Runs `post-save --config <config> <args>`.
fn with_config(config: &Path, args: &[&str]) -> Run {
    let path = config.to_str().expect("UTF-8 temp path");
    let mut all = vec!["--config", path];
    all.extend_from_slice(args);
    post_save(&all)
}

/// Runs `post-save --config <config> --database-url <db> <args>`.
fn against(db: &TestDb, config: &Path, args: &[&str]) -> Run {
    let path = config.to_str().expect("UTF-8 temp path");
    let mut all = vec!["--config", path, "--database-url", &db.conninfo];
    all.extend_from_slice(args);
    post_save(&all)
}

/// A directory for configuration files, removed at the end of the test.
struct Files(tempfile::TempDir);

impl Files {
    fn new() -> Files {
        Files(tempfile::Builder::new().prefix("post-save-cli-").tempdir().expect("temp dir"))
    }

    /// Writes `text` to `<dir>/<name>` and returns the path.
    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.path().join(name);
        std::fs::write(&path, text).expect("writing a config file");
        path
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Bad configuration files: exit 78, naming the key and the line.
// ---------------------------------------------------------------------------------------------

/// A valid config: 1 watch (lines 1-3) and 1 handler (lines 5-8). Cases append lines 9+ or
/// replace one line.
const BASE: &str = r#"[[watch]]
table = "public.shop_order"
operations = ["insert", "update"]

[[handler]]
name = "order-log"
sender = "public.shop_order"
kind = "log"
"#;

/// One broken config: its text, the key the error must name and the line it must name.
struct Broken {
    name: &'static str,
    text: String,
    key: &'static str,
    line: usize,
    /// Part of the message.
    message: &'static str,
}

fn broken_configs() -> Vec<Broken> {
    // pushed to only when the webhook kind is built
    #[allow(unused_mut)]
    let mut broken = vec![
        Broken {
            name: "unknown-handler-key",
            text: format!("{BASE}colour = \"red\"\n"),
            key: "handler[0].colour",
            line: 9,
            message: "unknown key",
        },
        Broken {
            name: "wrong-type",
            text: BASE.replace("kind = \"log\"", "kind = \"log\"\ncreated = \"yes\""),
            key: "handler[0].created",
            line: 9,
            message: "expected a boolean",
        },
        Broken {
            name: "unknown-top-level-key",
            text: format!("retries = 3\n{BASE}"),
            key: "retries",
            line: 1,
            message: "unknown key; expected one of `database`, `daemon`, `watch`, `handler`",
        },
        Broken {
            name: "invalid-toml",
            text: BASE.replace("kind = \"log\"", "kind = log"),
            key: "handler[0].kind",
            line: 8,
            message: "string values must be quoted",
        },
        Broken {
            name: "unknown-watch-key",
            text: BASE.replace("operations =", "colour = \"red\"\noperations ="),
            key: "watch[0].colour",
            line: 3,
            message: "unknown key; expected one of `table`, `operations`",
        },
        Broken {
            name: "unwatched-sender",
            text: BASE.replace("sender = \"public.shop_order\"", "sender = [\"public.shop_order\", \"public.refund\"]"),
            key: "handler[0].sender",
            line: 7,
            message: "sender `public.refund` is not a watched table",
        },
        Broken {
            name: "unknown-kind",
            text: BASE.replace("kind = \"log\"", "kind = \"carrier-pigeon\""),
            key: "handler[0].kind",
            line: 8,
            message: "unknown handler kind `carrier-pigeon`",
        },
        Broken {
            name: "unknown-operation",
            text: BASE.replace("\"insert\", \"update\"", "\"upsert\""),
            key: "watch[0].operations",
            line: 3,
            message: "unknown operation `upsert`",
        },
        Broken {
            name: "bad-duration",
            text: format!("{BASE}timeout = \"soon\"\n"),
            key: "handler[0].timeout",
            line: 9,
            message: "invalid duration `soon`",
        },
        Broken {
            name: "second-handler",
            text: format!("{BASE}\n[[handler]]\nname = \"other\"\nkind = \"log\"\nconcurrency = 0\n"),
            key: "handler[1].concurrency",
            line: 13,
            message: "must be at least 1",
        },
        Broken {
            name: "misspelt-exec-command",
            text: BASE.replace("kind = \"log\"", "kind = \"exec\"\ncomand = [\"/bin/true\"]"),
            key: "handler[0].comand",
            line: 9,
            message: "unknown key; did you mean `command`?",
        },
        Broken {
            name: "misspelt-key-and-missing-command",
            text: BASE.replace("kind = \"log\"", "kind = \"exec\"\ntimout = \"5s\""),
            key: "handler[0].timout",
            line: 9,
            message: "unknown key; did you mean `timeout`?",
        },
        Broken {
            name: "misspelt-watch-table",
            text: BASE.replace("table =", "tabel ="),
            key: "watch[0].tabel",
            line: 2,
            message: "unknown key; did you mean `table`?",
        },
        Broken {
            name: "misspelt-daemon-key",
            text: format!("{BASE}\n[daemon]\nmax_inflight = 10\n"),
            key: "daemon.max_inflight",
            line: 11,
            message: "unknown key; did you mean `max_in_flight`?",
        },
        Broken {
            name: "misspelt-database-key",
            text: format!("[database]\nulr = \"postgres://localhost/shop\"\n\n{BASE}"),
            key: "database.ulr",
            line: 2,
            message: "unknown key; did you mean `url`?",
        },
        Broken {
            name: "retry-inline-table",
            text: format!("{BASE}retry = {{ attempts = 3, tries = 4 }}\n"),
            key: "handler[0].retry.tries",
            line: 9,
            message: "unknown key",
        },
    ];
    #[cfg(feature = "webhook")]
    broken.push(Broken {
        name: "misspelt-webhook-url",
        text: BASE.replace("kind = \"log\"", "kind = \"webhook\"\nulr = \"http://127.0.0.1:1/\""),
        key: "handler[0].ulr",
        line: 9,
        message: "unknown key; did you mean `url`?",
    });
    broken
}

/// The line `Display` of `ConfigError` puts first: `<file>:<line>: key `<key>`: `.
fn location(path: &Path, b: &Broken) -> String {
    format!("{}:{}: key `{}`: ", path.display(), b.line, b.key)
}

#[test]
fn broken_configs_exit_78_naming_key_and_line() {
    let files = Files::new();
    for b in broken_configs() {
        // The case itself is right: the named line holds the key.
        let bad_line = b.text.lines().nth(b.line - 1).unwrap_or_else(|| panic!("{}: no line {}", b.name, b.line));
        let short_key = b.key.rsplit('.').next().unwrap_or(b.key);
        let short_key = short_key.rsplit(']').next().unwrap_or(short_key);
        assert!(bad_line.contains(short_key), "{}: line {} is {bad_line:?}", b.name, b.line);

        let path = files.write(&format!("{}.toml", b.name), &b.text);
        let want = location(&path, &b);
        for args in [&["config", "check"][..], &["handlers", "list"], &["handlers", "list", "--json"]] {
            let run = with_config(&path, args);
            run.code(78).stderr_has(&want).stderr_has(b.message);
            assert!(run.stdout.is_empty(), "{}: {}: printed to stdout: {}", b.name, run.what, run.stdout);
        }
        // The daemon refuses to start before connecting anywhere: the database given is one
        // nobody listens on, which would be exit 69 (or endless reconnecting) if it tried.
        let path_str = path.to_str().unwrap();
        let run = post_save(&["--config", path_str, "--database-url", UNREACHABLE, "run"]);
        run.code(78).stderr_has(&want).stderr_has(b.message);
        assert!(!run.stderr.contains("connect"), "{}: run tried to connect:\n{}", b.name, run.stderr);
    }
}

#[test]
fn the_error_message_is_one_line() {
    let files = Files::new();
    for b in broken_configs() {
        let path = files.write(&format!("{}.toml", b.name), &b.text);
        let run = with_config(&path, &["config", "check"]);
        run.code(78);
        let lines: Vec<&str> = run.stderr.lines().filter(|l| l.starts_with("error: ")).collect();
        assert_eq!(lines.len(), 1, "{}: one error line wanted:\n{}", b.name, run.stderr);
        assert!(lines[0].starts_with(&format!("error: {}", location(&path, &b))), "{}: {}", b.name, lines[0]);
    }
}

/// BUG: the toml crate's type errors end in a newline, which `Section::take` keeps, so stderr
/// has a blank line after `error: …: expected a boolean`.
#[test]
fn wrong_type_message_has_no_trailing_newline() {
    let files = Files::new();
    let text = BASE.replace("kind = \"log\"", "kind = \"log\"\ncreated = \"yes\"");
    let path = files.write("wrong-type.toml", &text);
    let run = with_config(&path, &["config", "check"]);
    run.code(78);
    assert!(!run.stderr.contains("\n\n"), "blank line in stderr: {:?}", run.stderr);
}

/// BUG: keys of a dotted key (`retry.attempts = 0`) or a `[handler.retry]` sub-table are
/// reported at the `[[handler]]` header line, not at their own line.
#[test]
fn nested_retry_keys_are_located_at_their_own_line() {
    let files = Files::new();
    let dotted = files.write("dotted.toml", &format!("{BASE}retry.attempts = 0\n"));
    with_config(&dotted, &["config", "check"])
        .code(78)
        .stderr_has(&format!("{}:9: key `handler[0].retry.attempts`", dotted.display()));
    let sub = files.write("sub.toml", &format!("{BASE}\n[handler.retry]\nattempts = 0\n"));
    with_config(&sub, &["config", "check"])
        .code(78)
        .stderr_has(&format!("{}:11: key `handler[0].retry.attempts`", sub.display()));
}

#[test]
fn a_missing_config_file_is_a_config_error() {
    let files = Files::new();
    let path = files.0.path().join("absent.toml");
    with_config(&path, &["config", "check"]).code(78).stderr_has(&path.display().to_string());
}

#[test]
fn the_config_file_can_come_from_post_save_config() {
    let files = Files::new();
    let good = files.write("good.toml", BASE);
    let out = command(&["config", "check"]).env("POST_SAVE_CONFIG", &good).output().unwrap();
    Run::from_output("POST_SAVE_CONFIG=good config check".into(), out).code(0);
    let bad = files.write("bad.toml", &format!("{BASE}colour = \"red\"\n"));
    let out = command(&["config", "check"]).env("POST_SAVE_CONFIG", &bad).output().unwrap();
    Run::from_output("POST_SAVE_CONFIG=bad config check".into(), out)
        .code(78)
        .stderr_has(&format!("{}:9: key `handler[0].colour`", bad.display()));
}

#[test]
fn the_runtime_runs_on_the_threads_asked_for_and_refuses_none() {
    let files = Files::new();
    let good = files.write("good.toml", BASE);
    let path = good.to_str().expect("UTF-8 temp path");
    with_config(&good, &["--threads", "4", "config", "check"]).code(0);
    let out = command(&["--config", path, "config", "check"]).env("POST_SAVE_THREADS", "3").output().unwrap();
    Run::from_output("POST_SAVE_THREADS=3 config check".into(), out).code(0);
    post_save(&["--threads", "0", "config", "check"]).code(2).stderr_has("--threads");
    let out = command(&["config", "check"]).env("POST_SAVE_THREADS", "many").output().unwrap();
    Run::from_output("POST_SAVE_THREADS=many config check".into(), out).code(2).stderr_has("--threads");
}

// ---------------------------------------------------------------------------------------------
// 2. The example config is valid.
// ---------------------------------------------------------------------------------------------

#[test]
fn config_check_accepts_the_example_config() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.example.toml");
    with_config(&example, &["config", "check"]).code(0).stderr_has("config ok: 1 watched tables, 2 handlers");
}

// ---------------------------------------------------------------------------------------------
// 3. handlers list
// ---------------------------------------------------------------------------------------------

const THREE_HANDLERS: &str = r#"
[[watch]]
table = "public.shop_order"
operations = ["insert", "update", "delete"]

[[watch]]
table = "billing.invoice"

[[handler]]
name = "audit"
kind = "log"
level = "warn"

[[handler]]
name = "order-confirmation"
sender = ["public.shop_order", "billing.invoice"]
created = true
columns = ["status", "quantity"]
timeout = "1m 30s"
concurrency = 3
retry = { attempts = 7, backoff = "2s" }
kind = "exec"
command = ["/usr/local/bin/send-confirmation", "--template", "order"]
env = { SMTP_PASSWORD = "secret" }

[[handler]]
name = "order-deleted"
sender = "shop_order"
signal = "post_delete"
columns = ["status"]
timeout = "250ms"
kind = "log"
"#;

#[test]
fn handlers_list_json_matches_the_config_without_a_database() {
    let files = Files::new();
    let path = files.write("three.toml", THREE_HANDLERS);
    let run = post_save(&[
        "--config",
        path.to_str().unwrap(),
        "--database-url",
        "host=/nonexistent",
        "handlers",
        "list",
        "--json",
    ]);
    run.code(0);
    let got: Value = serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("not JSON ({e}):\n{}", run.stdout));
    let want = json!([
        {
            "name": "audit",
            "kind": "log",
            "senders": [],
            "signal": "post_save",
            "created": null,
            "columns": [],
            "target": "log at WARN",
            "timeout": "30s",
            "concurrency": 16,
            "max_attempts": 5,
            "filter": null
        },
        {
            "name": "order-confirmation",
            "kind": "exec",
            "senders": ["public.shop_order", "billing.invoice"],
            "signal": "post_save",
            "created": true,
            "columns": ["status", "quantity"],
            "target": "/usr/local/bin/send-confirmation",
            "timeout": "1m 30s",
            "concurrency": 3,
            "max_attempts": 7,
            "filter": null
        },
        {
            "name": "order-deleted",
            "kind": "log",
            "senders": ["public.shop_order"],
            "signal": "post_delete",
            "created": null,
            "columns": ["status"],
            "target": "log at INFO",
            "timeout": "250ms",
            "concurrency": 16,
            "max_attempts": 5,
            "filter": null
        }
    ]);
    // Field by field first, for a readable failure; then the whole, so no field is extra.
    let (got_list, want_list) = (got.as_array().expect("a JSON array"), want.as_array().unwrap());
    assert_eq!(got_list.len(), want_list.len(), "{}", run.stdout);
    for (g, w) in got_list.iter().zip(want_list) {
        for (field, value) in w.as_object().unwrap() {
            assert_eq!(&g[field], value, "handler {}: field {field}", w["name"]);
        }
    }
    assert_eq!(got, want);
    assert!(!run.stdout.contains("secret"), "an env value leaked into the listing");
}

#[test]
fn handlers_list_without_a_terminal_is_tab_separated() {
    let files = Files::new();
    let path = files.write("three.toml", THREE_HANDLERS);
    let run =
        post_save(&["--config", path.to_str().unwrap(), "--database-url", "host=/nonexistent", "handlers", "list"]);
    run.code(0);
    let lines: Vec<Vec<&str>> = run.stdout.lines().map(|l| l.split('\t').collect()).collect();
    assert_eq!(
        lines,
        vec![
            vec!["name", "kind", "senders", "signal", "created", "columns", "target"],
            vec!["audit", "log", "*", "post_save", "any", "*", "log at WARN"],
            vec![
                "order-confirmation",
                "exec",
                "public.shop_order,billing.invoice",
                "post_save",
                "created",
                "status,quantity",
                "/usr/local/bin/send-confirmation"
            ],
            vec!["order-deleted", "log", "public.shop_order", "post_delete", "any", "status", "log at INFO"],
        ],
        "{}",
        run.stdout
    );
}

/// A config with enough handlers that the listing is far larger than a pipe's buffer (64 KiB),
/// so writing it must hit the closed pipe.
fn many_handlers(files: &Files) -> PathBuf {
    let mut text = String::from("[[watch]]\ntable = \"public.shop_order\"\n");
    for i in 0..3000 {
        text.push_str(&format!(
            "\n[[handler]]\nname = \"handler-{i:04}-with-a-name-long-enough-to-fill-a-pipe\"\nkind = \"log\"\n"
        ));
    }
    files.write("many.toml", &text)
}

/// Spawns `post-save --config <config> <args>` with stdout a pipe whose read end is closed at
/// once (`post-save … | head -0`), and returns how it ended.
fn into_closed_pipe(config: &Path, args: &[&str]) -> Run {
    let mut cmd = binary();
    cmd.arg("--config").arg(config).args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawning post-save");
    drop(child.stdout.take());
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let lines: Vec<String> = BufReader::new(stderr).lines().map_while(Result::ok).collect();
        let status = child.wait();
        let _ = tx.send((status, lines));
    });
    let (status, lines) = rx.recv_timeout(PATIENCE).expect("post-save did not exit after its stdout was closed");
    let status = status.unwrap();
    Run {
        code: status.code().unwrap_or_else(|| panic!("killed by a signal: {status}")),
        stdout: String::new(),
        stderr: lines.join("\n"),
        what: format!("post-save {} | head -0", args.join(" ")),
    }
}

#[test]
fn handlers_list_into_a_closed_pipe_exits_0() {
    let files = Files::new();
    let path = many_handlers(&files);
    let run = into_closed_pipe(&path, &["handlers", "list"]);
    run.code(0);
    assert!(!run.stderr.contains("error"), "{}", run.stderr);
}

/// BUG: the JSON listing is written with `serde_json::to_writer_pretty`, whose error hides the
/// `io::Error` from `exit_code` (serde_json's `source()` skips it), so EPIPE exits 1 with
/// `error: writing JSON: Broken pipe (os error 32)`.
#[test]
fn handlers_list_json_into_a_closed_pipe_exits_0() {
    let files = Files::new();
    let path = many_handlers(&files);
    let run = into_closed_pipe(&path, &["handlers", "list", "--json"]);
    run.code(0);
    assert!(!run.stderr.contains("error"), "{}", run.stderr);
}

// ---------------------------------------------------------------------------------------------
// 4. triggers
// ---------------------------------------------------------------------------------------------

const WATCH_SHOP_ORDER: &str = "[[watch]]\ntable = \"public.shop_order\"\nmode = \"durable\"\n";

async fn shop_db() -> TestDb {
    let db = TestDb::new().await;
    db.psql_ok(SHOP_ORDER);
    db
}

/// The number of tables with capture triggers in the database.
async fn capture_triggers(db: &TestDb) -> i64 {
    let client = db.client().await;
    client
        .query_one(
            "SELECT count(DISTINCT tgrelid) FROM pg_trigger \
              WHERE tgname IN ('post_save_insert', 'post_save_update', 'post_save_delete') AND NOT tgisinternal",
            &[],
        )
        .await
        .expect("counting triggers")
        .get(0)
}

/// The drift lines `triggers check` printed.
fn drift_lines(run: &Run) -> Vec<&str> {
    run.stdout.lines().collect()
}

#[tokio::test]
async fn triggers_check_install_check_remove() {
    let db = shop_db().await;
    let files = Files::new();
    let config = files.write("shop.toml", WATCH_SHOP_ORDER);

    let run = against(&db, &config, &["triggers", "check"]);
    run.code(1);
    assert_eq!(drift_lines(&run), ["public.shop_order: watched but has no capture trigger"]);

    let sql = against(&db, &config, &["triggers", "sql"]);
    sql.code(0)
        .stdout_has("CREATE TRIGGER \"post_save_insert\" AFTER INSERT ON \"public\".\"shop_order\"")
        .stdout_has("CREATE TRIGGER \"post_save_update\" AFTER UPDATE ON \"public\".\"shop_order\"")
        .stdout_has("ENABLE TRIGGER \"post_save_insert\"")
        .stdout_has("ENABLE REPLICA TRIGGER \"post_save_insert_replica\"")
        .stdout_has("ENABLE ALWAYS TRIGGER \"post_save_update\"")
        .stdout_has("FOR EACH STATEMENT EXECUTE FUNCTION post_save.\"capture_");
    assert_eq!(capture_triggers(&db).await, 0, "`triggers sql` only prints");

    against(&db, &config, &["triggers", "install"]).code(0).stderr_has("triggers installed on 1 tables");
    assert_eq!(capture_triggers(&db).await, 1);
    against(&db, &config, &["triggers", "install"])
        .code(0)
        .stderr_has("triggers already match the config (1 tables): nothing changed");
    assert_eq!(capture_triggers(&db).await, 1, "install is idempotent");

    let run = against(&db, &config, &["triggers", "check"]);
    run.code(0).stderr_has("triggers match the config (1 tables)");
    assert!(run.stdout.is_empty(), "{}", run.stdout);

    against(&db, &config, &["triggers", "remove"]).code(0).stderr_has("triggers removed from 1 tables");
    assert_eq!(capture_triggers(&db).await, 0);
    let run = against(&db, &config, &["triggers", "check"]);
    run.code(1);
    assert_eq!(drift_lines(&run), ["public.shop_order: watched but has no capture trigger"]);
    against(&db, &config, &["triggers", "remove"]).code(0).stderr_has("triggers removed from 0 tables");
}

#[tokio::test]
async fn triggers_check_reports_changed_options() {
    let db = shop_db().await;
    let files = Files::new();
    let config = files.write("shop.toml", WATCH_SHOP_ORDER);
    against(&db, &config, &["triggers", "install"]).code(0);
    against(&db, &config, &["triggers", "check"]).code(0);

    let cases = [
        ("mode", WATCH_SHOP_ORDER.replace("durable", "notify"), "mode: durable → notify"),
        ("redact", format!("{WATCH_SHOP_ORDER}redact = [\"product\"]\n"), "redact: {} → {\"product\"}"),
        ("include_old", format!("{WATCH_SHOP_ORDER}include_old = true\n"), "include_old: false → true"),
        ("columns", format!("{WATCH_SHOP_ORDER}columns = [\"quantity\"]\n"), "columns: {} → {\"quantity\"}"),
        (
            "operations",
            format!("{WATCH_SHOP_ORDER}operations = [\"insert\", \"update\", \"delete\"]\n"),
            "operations: missing post_save_delete",
        ),
    ];
    for (name, text, what) in cases {
        let changed = files.write(&format!("{name}.toml"), &text);
        let run = against(&db, &changed, &["triggers", "check"]);
        run.code(1);
        let lines = drift_lines(&run);
        assert_eq!(lines.len(), 1, "{name}: {}", run.stdout);
        assert!(lines[0].starts_with("public.shop_order: capture differs from the config"), "{name}: {}", lines[0]);
        assert!(lines[0].contains(what), "{name}: {:?} lacks {what:?}", lines[0]);
        // Installing the changed config brings the database in line with it.
        against(&db, &changed, &["triggers", "install"]).code(0);
        against(&db, &changed, &["triggers", "check"]).code(0);
        let run = against(&db, &config, &["triggers", "check"]);
        run.code(1).stdout_has("public.shop_order: capture differs from the config");
        against(&db, &config, &["triggers", "install"]).code(0);
    }
    against(&db, &config, &["triggers", "check"]).code(0);
}

/// A capture written by an earlier post-save (its options line has no `format`, as before
/// format 2) is reported as such, and `triggers install` replaces it.
#[tokio::test]
async fn triggers_check_reports_a_capture_of_another_post_save_version() {
    let db = shop_db().await;
    let files = Files::new();
    let config = files.write("shop.toml", WATCH_SHOP_ORDER);
    against(&db, &config, &["triggers", "install"]).code(0);
    db.psql_ok(
        "DO $$ DECLARE src text; BEGIN \
           SELECT pg_get_functiondef(p.oid) INTO src FROM pg_proc p \
             JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = 'post_save' AND p.proname LIKE 'capture%'; \
           EXECUTE replace(src, ',\"format\":\"4\"}', '}'); END $$",
    );
    let run = against(&db, &config, &["triggers", "check"]);
    run.code(1);
    let lines = drift_lines(&run);
    assert_eq!(lines.len(), 1, "{}", run.stdout);
    assert!(lines[0].contains("generated by another version of post-save (capture format - → 4)"), "{}", lines[0]);
    against(&db, &config, &["triggers", "install"]).code(0);
    against(&db, &config, &["triggers", "check"]).code(0);
}

#[tokio::test]
async fn triggers_check_reports_a_trigger_not_enabled_always() {
    let db = shop_db().await;
    let files = Files::new();
    let config = files.write("shop.toml", WATCH_SHOP_ORDER);
    against(&db, &config, &["triggers", "install"]).code(0);
    db.psql_ok("ALTER TABLE shop_order ENABLE TRIGGER post_save_update");
    let run = against(&db, &config, &["triggers", "check"]);
    run.code(1);
    assert_eq!(drift_lines(&run), ["public.shop_order: capture differs from the config (not enabled ALWAYS)"]);
    against(&db, &config, &["triggers", "install"]).code(0);
    against(&db, &config, &["triggers", "check"]).code(0);
}

#[tokio::test]
async fn triggers_check_reports_an_unwatched_table_and_install_removes_its_trigger() {
    let db = shop_db().await;
    db.psql_ok("CREATE TABLE shop_customer (id bigint PRIMARY KEY, email text)");
    let files = Files::new();
    let both = files.write("both.toml", &format!("{WATCH_SHOP_ORDER}\n[[watch]]\ntable = \"shop_customer\"\n"));
    let one = files.write("one.toml", WATCH_SHOP_ORDER);
    against(&db, &both, &["triggers", "install"]).code(0).stderr_has("triggers installed on 2 tables");
    against(&db, &both, &["triggers", "check"]).code(0);

    let run = against(&db, &one, &["triggers", "check"]);
    run.code(1);
    assert_eq!(drift_lines(&run), ["public.shop_customer: has a capture trigger but is not watched"]);
    against(&db, &one, &["triggers", "sql"])
        .code(0)
        .stdout_has("DROP FUNCTION IF EXISTS post_save.\"capture_")
        .stdout_has("() CASCADE;");

    against(&db, &one, &["triggers", "install"]).code(0);
    against(&db, &one, &["triggers", "check"]).code(0);
    assert_eq!(capture_triggers(&db).await, 1);
}

#[tokio::test]
async fn triggers_check_reports_a_trigger_dropped_by_hand() {
    let db = shop_db().await;
    let files = Files::new();
    let config = files.write("shop.toml", WATCH_SHOP_ORDER);
    against(&db, &config, &["triggers", "install"]).code(0);
    db.psql_ok("DROP TRIGGER post_save_update ON shop_order");
    let run = against(&db, &config, &["triggers", "check"]);
    run.code(1);
    assert_eq!(
        drift_lines(&run),
        ["public.shop_order: capture differs from the config (operations: missing post_save_update)"]
    );
    db.psql_ok("DROP TRIGGER post_save_insert ON shop_order");
    let run = against(&db, &config, &["triggers", "check"]);
    run.code(1);
    assert_eq!(drift_lines(&run), ["public.shop_order: watched but has no capture trigger"]);
    against(&db, &config, &["triggers", "install"]).code(0);
    against(&db, &config, &["triggers", "check"]).code(0);
}

#[tokio::test]
async fn triggers_handle_quoted_names() {
    let db = TestDb::new().await;
    db.psql_ok(r#"CREATE SCHEMA "Sales"; CREATE TABLE "Sales"."Order Items" ("Order Id" bigint, line int, PRIMARY KEY ("Order Id", line))"#);
    let files = Files::new();
    let config = files.write("quoted.toml", "[[watch]]\ntable = '\"Sales\".\"Order Items\"'\n");
    against(&db, &config, &["triggers", "sql"])
        .code(0)
        .stdout_has(r#"CREATE TRIGGER "post_save_insert" AFTER INSERT ON "Sales"."Order Items""#)
        .stdout_has(r#"v_keys   text[] := '{"Order Id","line"}'::text[];"#)
        .stdout_has(
            r#"CREATE TRIGGER "post_save_update" AFTER UPDATE ON "Sales"."Order Items"
    FOR EACH ROW"#,
        );
    let run = against(&db, &config, &["triggers", "check"]);
    run.code(1);
    assert_eq!(drift_lines(&run), ["Sales.Order Items: watched but has no capture trigger"]);
    against(&db, &config, &["triggers", "install"]).code(0);
    against(&db, &config, &["triggers", "check"]).code(0);
}

#[tokio::test]
async fn triggers_install_fails_on_a_missing_table_and_changes_nothing() {
    let db = shop_db().await;
    let files = Files::new();
    let config = files.write("missing.toml", &format!("{WATCH_SHOP_ORDER}\n[[watch]]\ntable = \"public.refund\"\n"));
    let run = against(&db, &config, &["triggers", "install"]);
    run.code(1).stderr_has("public.refund").stderr_has("does not exist");
    assert_eq!(capture_triggers(&db).await, 0, "install is all or nothing");
    let run = against(&db, &config, &["triggers", "check"]);
    run.code(1);
    let mut lines = drift_lines(&run);
    lines.sort_unstable();
    assert_eq!(
        lines,
        ["public.refund: watched table does not exist", "public.shop_order: watched but has no capture trigger"]
    );
    against(&db, &config, &["triggers", "sql"]).code(1).stderr_has("public.refund");
}

#[tokio::test]
async fn triggers_install_fails_on_a_missing_redact_column() {
    let db = shop_db().await;
    let files = Files::new();
    let config = files.write("redact.toml", &format!("{WATCH_SHOP_ORDER}redact = [\"card_number\"]\n"));
    let run = against(&db, &config, &["triggers", "install"]);
    run.code(1).stderr_has("card_number").stderr_has("public.shop_order").stderr_has("redact");
    assert_eq!(capture_triggers(&db).await, 0);
    let pk = files.write("pk.toml", &format!("{WATCH_SHOP_ORDER}pk = [\"order_no\"]\n"));
    against(&db, &pk, &["triggers", "install"]).code(1).stderr_has("order_no").stderr_has("pk");
}

/// BUG: `triggers check` turns a configured column that does not exist into a bogus
/// `pk: {"id"} → {}` difference (or, with no trigger yet, plain "missing") instead of naming
/// the column: `check` maps `TriggerError::NoColumn` to an empty primary key.
#[tokio::test]
async fn triggers_check_names_a_missing_column() {
    let db = shop_db().await;
    let files = Files::new();
    let config = files.write("shop.toml", WATCH_SHOP_ORDER);
    against(&db, &config, &["triggers", "install"]).code(0);
    let bad = files.write("redact.toml", &format!("{WATCH_SHOP_ORDER}redact = [\"card_number\"]\n"));
    let run = against(&db, &bad, &["triggers", "check"]);
    run.code(1).stdout_has("card_number");
    assert!(!run.stdout.contains("pk:"), "{}", run.stdout);
}

// ---------------------------------------------------------------------------------------------
// 5. migrate
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn migrate_is_idempotent_and_keeps_its_history_in_its_own_schema() {
    let db = TestDb::new().await;
    let files = Files::new();
    let config = files.write("shop.toml", "");
    let first = against(&db, &config, &["migrate"]);
    first.code(0).stderr_has("applied ");
    against(&db, &config, &["migrate"]).code(0).stderr_has("post_save schema is up to date");

    let client = db.client().await;
    let row = client
        .query_one(
            "SELECT to_regclass('post_save.schema_history') IS NOT NULL, \
                    to_regclass('public.refinery_schema_history') IS NULL, \
                    to_regclass('post_save.event') IS NOT NULL, \
                    to_regclass('post_save.doorbell') IS NOT NULL",
            &[],
        )
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0), "post_save.schema_history is missing");
    assert!(row.get::<_, bool>(1), "public.refinery_schema_history exists");
    assert!(row.get::<_, bool>(2), "post_save.event is missing");
    assert!(row.get::<_, bool>(3), "post_save.doorbell is missing");
    let applied: i64 = client.query_one("SELECT count(*) FROM post_save.schema_history", &[]).await.unwrap().get(0);
    let printed = first.stderr.lines().filter(|l| l.starts_with("applied ")).count();
    assert_eq!(applied as usize, printed, "{}", first.stderr);
}

// ---------------------------------------------------------------------------------------------
// 6. Database unreachable: 69.
// ---------------------------------------------------------------------------------------------

#[test]
fn an_unreachable_database_exits_69() {
    let files = Files::new();
    let config = files.write("shop.toml", WATCH_SHOP_ORDER);
    let path = config.to_str().unwrap();
    for args in [
        &["migrate"][..],
        &["triggers", "check"],
        &["triggers", "install"],
        &["triggers", "remove"],
        &["triggers", "sql"],
    ] {
        let mut all = vec!["--config", path, "--database-url", UNREACHABLE];
        all.extend_from_slice(args);
        post_save(&all).code(69).stderr_has("cannot connect to the database");
    }
    // Without a config, migrate still knows where to connect.
    post_save(&["--database-url", UNREACHABLE, "migrate"]).code(69);
}

#[test]
fn a_malformed_database_url_is_a_config_error() {
    let files = Files::new();
    let config = files.write("shop.toml", WATCH_SHOP_ORDER);
    with_config(&config, &["--database-url", "port=notanumber", "migrate"]).code(78);
}

// ---------------------------------------------------------------------------------------------
// 7. --help and usage errors.
// ---------------------------------------------------------------------------------------------

#[test]
fn help_works_for_every_command() {
    let commands: &[&[&str]] = &[
        &[],
        &["run"],
        &["demo"],
        &["migrate"],
        &["triggers"],
        &["triggers", "install"],
        &["triggers", "remove"],
        &["triggers", "check"],
        &["triggers", "sql"],
        &["handlers"],
        &["handlers", "list"],
        &["config"],
        &["config", "check"],
    ];
    for command in commands {
        let mut args = command.to_vec();
        args.push("--help");
        let run = post_save(&args);
        run.code(0).stdout_has("Usage: post-save");
        assert!(run.stderr.is_empty(), "{}: {}", run.what, run.stderr);
    }
    post_save(&["--help"]).stdout_has("triggers").stdout_has("handlers").stdout_has("migrate");
    post_save(&["handlers", "list", "--help"]).stdout_has("--json");
    post_save(&["--version"]).code(0).stdout_has(env!("CARGO_PKG_VERSION"));
}

#[test]
fn usage_errors_exit_2() {
    post_save(&["frobnicate"]).code(2).stderr_has("frobnicate");
    post_save(&[]).code(2);
    post_save(&["triggers"]).code(2);
    post_save(&["triggers", "frobnicate"]).code(2);
    post_save(&["handlers", "list", "--yaml"]).code(2);
    post_save(&["--log-format", "xml", "config", "check"]).code(2);
}

// ---------------------------------------------------------------------------------------------
// Every handler kind: examples/handlers.toml is valid, and handlers list shows where each kind
// sends events without any secret.
// ---------------------------------------------------------------------------------------------

#[cfg(all(
    feature = "webhook",
    feature = "sql",
    feature = "nats",
    feature = "redis",
    feature = "amqp",
    feature = "celery",
    feature = "email"
))]
#[test]
fn every_kind_is_listed_with_its_target_and_no_secret() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/handlers.toml");
    with_config(&example, &["config", "check"]).code(0).stderr_has("config ok: 1 watched tables, 7 handlers");
    let out = binary()
        .args(["--config", example.to_str().unwrap(), "handlers", "list", "--json"])
        .env("BILLING_WEBHOOK_SECRET", "whsec_c2VjcmV0LXZhbHVl")
        .output()
        .expect("post-save runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let list: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let targets: Vec<(String, String)> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|h| (h["kind"].as_str().unwrap().to_owned(), h["target"].as_str().unwrap().to_owned()))
        .collect();
    let kinds: Vec<&str> = targets.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(kinds, ["webhook", "sql", "nats", "redis", "amqp", "celery", "email"]);
    let expect = [
        "billing.example.com",
        "UPDATE shop_customer",
        "subject shop.{{ sender }}.{{ op }}",
        "XADD post_save:{{ sender }}",
        "exchange shop key {{ sender }}.{{ op }}",
        "task shop.tasks.send_order_confirmation queue celery",
        "to sales@shop.example",
    ];
    for ((kind, target), want) in targets.iter().zip(expect) {
        assert!(target.contains(want), "{kind}: {target:?} lacks {want:?}");
    }
    let text = String::from_utf8_lossy(&out.stdout);
    for secret in ["whsec_", "c2VjcmV0", "SMTP_PASSWORD", "guest:guest"] {
        assert!(!text.contains(secret), "handlers list shows {secret:?}: {text}");
    }
}
