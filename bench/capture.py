#!/usr/bin/env python3
"""Side-by-side cost of change-capture techniques, measured with pgbench.

Run through ``bench/run``, which installs the packages and starts a private PostgreSQL
cluster; this script expects that cluster in the BENCH_* environment variables. Standard
library only (Python 3.11).

An *arm* is one capture technique (see ``ARMS``); a *workload* is one pgbench script (see
``WORKLOADS``). Every measurement runs one arm on one workload in a fresh database, and arms
alternate inside every round, so slow drift of the machine hits all arms alike. Ratios are
taken per round against the ``plain`` arm of the same round and workload.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

HERE = Path(__file__).resolve().parent

# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench/run",
        description="Measure the write cost of change-capture techniques side by side "
        "(ratio of pgbench TPS to the same workload without capture).",
    )
    p.add_argument("--quick", action="store_true",
                   help="1 round of 2 s per measurement; results go to a temp dir unless --out")
    p.add_argument("--rounds", type=int, help="rounds per workload (default 2, --quick: 1)")
    p.add_argument("--seconds", type=int, help="pgbench -T per measurement (default 10, --quick: 2)")
    p.add_argument("--out", type=Path, help="directory for capture-<timestamp>.{md,json} "
                   "(default bench/results, --quick: a new temp dir)")
    p.add_argument("--arms", help="comma-separated subset of arms (plain is always added)")
    p.add_argument("--workloads", help="comma-separated subset of workloads: "
                   + ",".join(w.key for w in WORKLOADS))
    p.add_argument("--no-build", action="store_true",
                   help="do not run cargo build; use an existing post-save binary if any")
    p.add_argument("--require-postsave", action="store_true",
                   help="fail (instead of skipping) when the post-save arms cannot run")
    p.add_argument("--check-args", action="store_true", help=argparse.SUPPRESS)
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = build_parser()
    a = p.parse_args(argv)
    a.rounds = a.rounds if a.rounds is not None else (1 if a.quick else 2)
    a.seconds = a.seconds if a.seconds is not None else (2 if a.quick else 10)
    if a.rounds < 1 or a.seconds < 1:
        p.error("--rounds and --seconds must be at least 1")
    known_arms = {arm.name for arm in ARMS}
    if a.arms:
        wanted = [x.strip() for x in a.arms.split(",") if x.strip()]
        bad = [x for x in wanted if x not in known_arms]
        if bad:
            p.error(f"unknown arm(s): {', '.join(bad)} (known: {', '.join(sorted(known_arms))})")
        a.arm_names = ["plain"] + [x for x in wanted if x != "plain"]
    else:
        a.arm_names = [arm.name for arm in ARMS]
    known_w = {w.key for w in WORKLOADS}
    if a.workloads:
        wanted = [x.strip() for x in a.workloads.split(",") if x.strip()]
        bad = [x for x in wanted if x not in known_w]
        if bad:
            p.error(f"unknown workload(s): {', '.join(bad)} (known: {', '.join(sorted(known_w))})")
        a.workload_keys = wanted
    else:
        a.workload_keys = [w.key for w in WORKLOADS]
    return a


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# The cluster started by bench/run
# ---------------------------------------------------------------------------------------------


class BenchError(Exception):
    """A measurement or its setup failed."""


@dataclasses.dataclass
class Cluster:
    host: str  # unix socket directory
    port: int
    pgdata: Path
    pgbin: Path
    work: Path

    @classmethod
    def from_env(cls) -> "Cluster":
        try:
            return cls(
                host=os.environ["BENCH_PGHOST"],
                port=int(os.environ["BENCH_PGPORT"]),
                pgdata=Path(os.environ["BENCH_PGDATA"]),
                pgbin=Path(os.environ["BENCH_PGBIN"]),
                work=Path(os.environ["BENCH_WORK"]),
            )
        except KeyError as e:
            raise SystemExit(f"bench: {e.args[0]} not set; run this through bench/run") from None

    def tool(self, name: str) -> str:
        return str(self.pgbin / name)

    def conn_args(self, db: str) -> list[str]:
        return ["-h", self.host, "-p", str(self.port), "-U", "postgres", "-d", db]

    def url(self, db: str) -> str:
        host = self.host.replace("/", "%2F")
        return f"postgresql://postgres@{host}:{self.port}/{db}"

    def psql(self, db: str, sql: str, timeout: float = 600) -> str:
        """Run SQL (a script) with ON_ERROR_STOP; return unaligned, tuples-only output."""
        r = subprocess.run(
            [self.tool("psql"), *self.conn_args(db), "-X", "-q", "-A", "-t",
             "-v", "ON_ERROR_STOP=1", "-f", "-"],
            input=sql, capture_output=True, text=True, timeout=timeout,
        )
        if r.returncode != 0:
            raise BenchError(f"psql failed on {db}: {r.stderr.strip()}\n--- sql ---\n{sql.strip()}")
        return r.stdout.strip()

    def create_db(self, db: str) -> None:
        self.drop_db(db)
        self.psql("postgres", f'create database "{db}"')

    def drop_db(self, db: str) -> None:
        self.psql("postgres", f"""
            select pg_terminate_backend(active_pid) from pg_replication_slots
             where database = '{db}' and active_pid is not null;
            select pg_drop_replication_slot(slot_name) from pg_replication_slots
             where database = '{db}' and not active;
            drop database if exists "{db}" with (force);
        """)


# ---------------------------------------------------------------------------------------------
# LISTEN client: a minimal protocol-v3 client over the unix socket (trust auth), so the
# naive NOTIFY arm has a consumer draining the queue without any pip package.
# ---------------------------------------------------------------------------------------------


def listen_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="capture.py listen")
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--db", required=True)
    p.add_argument("--channel", required=True)
    p.add_argument("--count-file", required=True)
    a = p.parse_args(argv)

    count = 0
    stop = False

    def on_term(_sig, _frm):
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)

    count_file = Path(a.count_file)

    def write_count():
        tmp = count_file.with_suffix(".tmp")
        tmp.write_text(f"{count}\n")
        tmp.replace(count_file)

    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(f"{a.host}/.s.PGSQL.{a.port}")
    params = b"".join(k + b"\0" + v.encode() + b"\0" for k, v in [
        (b"user", "postgres"), (b"database", a.db), (b"application_name", "bench-listener")])
    body = struct.pack("!i", 196608) + params + b"\0"
    s.sendall(struct.pack("!i", len(body) + 4) + body)

    buf = bytearray()

    def messages() -> list[tuple[int, Optional[bytes]]]:
        """Take every complete message out of buf as (type, payload); keep the remainder.
        NotificationResponse payloads are not copied (only counted)."""
        out = []
        pos, n = 0, len(buf)
        while n - pos >= 5:
            (length,) = struct.unpack_from("!i", buf, pos + 1)
            if n - pos < 1 + length:
                break
            t = buf[pos]
            out.append((t, None if t == 0x41 else bytes(buf[pos + 5: pos + 1 + length])))
            pos += 1 + length
        del buf[:pos]
        return out

    def read_until(kind: int) -> None:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                raise SystemExit("listener: connection closed during startup")
            buf.extend(chunk)
            for t, payload in messages():
                if t == ord("E"):
                    raise SystemExit(f"listener: server error {payload!r}")
                if t == ord("R") and struct.unpack("!i", payload[:4])[0] != 0:
                    raise SystemExit("listener: server asks for a password; cluster must use trust")
                if t == kind:
                    return

    read_until(ord("Z"))  # ReadyForQuery after authentication
    q = f'LISTEN "{a.channel}"'.encode() + b"\0"
    s.sendall(b"Q" + struct.pack("!i", len(q) + 4) + q)
    read_until(ord("Z"))
    write_count()  # the count file's existence means "listening"
    s.settimeout(0.1)
    written_at = time.monotonic()
    written = 0
    while not stop:
        try:
            chunk = s.recv(1 << 20)
        except (socket.timeout, InterruptedError):
            chunk = b""
        else:
            if not chunk:
                break  # server closed the connection
            buf.extend(chunk)
            for t, _ in messages():
                if t == 0x41:  # 'A' NotificationResponse
                    count += 1
        if count != written and time.monotonic() - written_at > 0.1:
            write_count()
            written, written_at = count, time.monotonic()
    write_count()
    s.close()
    return 0


# ---------------------------------------------------------------------------------------------
# Arms
# ---------------------------------------------------------------------------------------------

TABLE_SQL = """
create table shop_order (
    id bigserial primary key,
    user_id bigint not null,
    product text not null,
    quantity int not null,
    created_at timestamptz not null default now()
);
"""


@dataclasses.dataclass
class Ctx:
    """What an arm's hooks get for one measurement."""

    cluster: Cluster
    db: str
    dir: Path  # scratch dir for this measurement
    postsave_bin: Optional[str]
    rows: int = 0  # rows written by the measured run (set once pgbench has finished)
    end_lsn: str = ""  # WAL position when pgbench finished

    def psql(self, sql: str) -> str:
        return self.cluster.psql(self.db, sql)


@dataclasses.dataclass
class Arm:
    """One capture technique.

    setup       SQL (str) or function(ctx), run after the table is created and pre-filled
    background  function(ctx) -> argv of a process that runs during the measurement
    ready       function(ctx) -> bool; the measurement starts once it is true
    drained     function(ctx) -> bool; true once the background consumer has caught up with
                everything written (polled after pgbench ends; the wait is reported, not timed)
    captured    SQL counting the events captured (sanity check: 0 before, = rows after)
    captured_from_listener  count the events the LISTEN client received instead
    teardown    function(ctx), run after the background process stopped (also on failure)
    available   function(env) -> None when the arm can run, else why it is skipped
    triggers    whether the arm puts a trigger on shop_order (checked after setup)
    """

    name: str
    stands_for: str
    setup: str | Callable[[Ctx], None] | None = None
    background: Optional[Callable[[Ctx], list[str]]] = None
    ready: Optional[Callable[[Ctx], bool]] = None
    drained: Optional[Callable[[Ctx], bool]] = None
    captured: Optional[str] = None
    teardown: Optional[Callable[[Ctx], None]] = None
    available: Optional[Callable[["Env"], Optional[str]]] = None
    captured_from_listener: bool = False
    triggers: bool = True


# --- naive NOTIFY ----------------------------------------------------------------------------

NAIVE_NOTIFY_SQL = """
create function bench_notify() returns trigger language plpgsql as $$
begin
    perform pg_notify('bench', row_to_json(NEW)::text);
    return null;
end $$;
create trigger bench_capture after insert or update on shop_order
    for each row execute function bench_notify();
"""


def listener_argv(ctx: Ctx) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "listen",
            "--host", ctx.cluster.host, "--port", str(ctx.cluster.port), "--db", ctx.db,
            "--channel", "bench", "--count-file", str(ctx.dir / "listener.count")]


def listener_ready(ctx: Ctx) -> bool:
    return (ctx.dir / "listener.count").exists()


def listener_drained(ctx: Ctx) -> bool:
    return read_count(ctx.dir / "listener.count") >= ctx.rows


# --- Hasura-style event log ------------------------------------------------------------------

EVENT_LOG_SQL = """
create table event_log (
    id bigserial primary key,
    schema_name text not null,
    table_name text not null,
    op text not null,
    payload jsonb not null,
    delivered boolean not null default false,
    created_at timestamptz not null default now()
);
create function bench_event_log() returns trigger language plpgsql as $$
begin
    insert into event_log (schema_name, table_name, op, payload)
    values (TG_TABLE_SCHEMA, TG_TABLE_NAME, TG_OP, row_to_json(NEW)::jsonb);
    return null;
end $$;
create trigger bench_capture after insert or update on shop_order
    for each row execute function bench_event_log();
"""

# --- PgQ ---------------------------------------------------------------------------------------

PGQ_SQL = """
create extension pgq;
select pgq.create_queue('q');
create trigger bench_capture after insert or update on shop_order
    for each row execute function pgq.logutriga('q');
"""

# --- logical decoding (wal2json) -------------------------------------------------------------

SLOT = "bench_slot"


def logical_setup(ctx: Ctx) -> None:
    r = subprocess.run(
        [ctx.cluster.tool("pg_recvlogical"), *ctx.cluster.conn_args(ctx.db), "--slot", SLOT,
         "--create-slot", "-P", "wal2json"],
        capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        raise BenchError(f"pg_recvlogical --create-slot failed: {r.stderr.strip()}")


def logical_argv(ctx: Ctx) -> list[str]:
    return [ctx.cluster.tool("pg_recvlogical"), *ctx.cluster.conn_args(ctx.db), "--slot", SLOT,
            "--start", "-o", "format-version=2", "-f", "/dev/null"]


def logical_ready(ctx: Ctx) -> bool:
    return ctx.psql(f"select count(*) from pg_replication_slots "
                    f"where slot_name = '{SLOT}' and active") == "1"


def logical_drained(ctx: Ctx) -> bool:
    # sent_lsn of the walsender serving the slot: how far decoding has got
    return ctx.psql(f"""
        select coalesce(bool_and(r.sent_lsn >= '{ctx.end_lsn}'::pg_lsn), false)
          from pg_replication_slots s join pg_stat_replication r on r.pid = s.active_pid
         where s.slot_name = '{SLOT}'
    """) == "t"


def logical_teardown(ctx: Ctx) -> None:
    ctx.psql(f"""
        select pg_terminate_backend(active_pid) from pg_replication_slots
         where slot_name = '{SLOT}' and active_pid is not null;
    """)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if ctx.psql(f"select count(*) from pg_replication_slots "
                    f"where slot_name = '{SLOT}' and active") == "0":
            break
        time.sleep(0.1)
    ctx.psql(f"select pg_drop_replication_slot(slot_name) from pg_replication_slots "
             f"where slot_name = '{SLOT}'")


# --- post-save (hook: fill in when the daemon exists) ----------------------------------------
#
# Everything post-save specific is in this block: the config file, the setup commands and the
# daemon command line. The arms are skipped, with a message, until the binary answers
# `post-save run --help` with a usage text.

POSTSAVE_CONFIG = """\
# written by bench/capture.py for one measurement
[database]
url = "{url}"

[[watch]]
table = "public.shop_order"
operations = ["insert", "update"]
mode = "{mode}"

[[handler]]
name = "bench-noop"
sender = "public.shop_order"
signal = "post_save"
kind = "log"
# below the default log filter: the handler runs for every event but prints nothing
level = "debug"
"""

POSTSAVE_SETUP_COMMANDS = [["migrate"], ["triggers", "install"]]
POSTSAVE_RUN_COMMAND = ["run"]


def postsave_argv(ctx: Ctx, sub: list[str]) -> list[str]:
    # `--config` is accepted by every subcommand (also POST_SAVE_CONFIG)
    return [ctx.postsave_bin or "post-save", "--config", str(ctx.dir / "post-save.toml"), *sub]


def postsave_setup(mode: str) -> Callable[[Ctx], None]:
    def setup(ctx: Ctx) -> None:
        (ctx.dir / "post-save.toml").write_text(POSTSAVE_CONFIG.format(
            url=ctx.cluster.url(ctx.db), mode=mode))
        for sub in POSTSAVE_SETUP_COMMANDS:
            argv = postsave_argv(ctx, sub)
            r = subprocess.run(argv, capture_output=True, text=True, timeout=120)
            if r.returncode != 0:
                raise BenchError(f"{' '.join(argv)} exited {r.returncode}: "
                                 f"{(r.stderr or r.stdout).strip()[-2000:]}")
    return setup


def postsave_run_argv(ctx: Ctx) -> list[str]:
    return postsave_argv(ctx, POSTSAVE_RUN_COMMAND)


def postsave_ready(ctx: Ctx) -> bool:
    # TODO(post-save): a better readiness signal (e.g. the daemon's LISTEN connection).
    return ctx.psql("select count(*) from pg_stat_activity where datname = current_database() "
                    "and pid <> pg_backend_pid() and backend_type = 'client backend'") != "0"


def postsave_available(env: "Env") -> Optional[str]:
    return env.postsave_skip_reason


ARMS: list[Arm] = [
    Arm("plain", "no capture: the baseline of every ratio", triggers=False),
    Arm("naive_notify",
        "per-row trigger pg_notify(row_to_json(NEW)) + one LISTEN client draining "
        "(django-pgpubsub, pg_eventserv)",
        setup=NAIVE_NOTIFY_SQL, background=listener_argv, ready=listener_ready,
        drained=listener_drained, captured_from_listener=True),
    Arm("event_log",
        "per-row trigger inserting row_to_json(NEW)::jsonb + op/table into an event table "
        "(Hasura event triggers)",
        setup=EVENT_LOG_SQL, captured="select count(*) from event_log"),
    Arm("pgq", "Skytools PgQ: pgq.logutriga('q') C trigger into the queue's event table",
        setup=PGQ_SQL, captured="select count(*) from pgq.event_template"),
    Arm("logical",
        "no trigger: wal2json logical slot read by pg_recvlogical during the run "
        "(Debezium, Sequin, Supabase)",
        setup=logical_setup, background=logical_argv, ready=logical_ready,
        drained=logical_drained, teardown=logical_teardown, triggers=False),
    Arm("postsave_notify", "post-save, watch mode = \"notify\" (daemon running)",
        setup=postsave_setup("notify"), background=postsave_run_argv, ready=postsave_ready,
        available=postsave_available),
    Arm("postsave_durable", "post-save, watch mode = \"durable\" (daemon running)",
        setup=postsave_setup("durable"), background=postsave_run_argv, ready=postsave_ready,
        available=postsave_available),
]

# ---------------------------------------------------------------------------------------------
# Workloads
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Workload:
    key: str
    title: str
    script: str
    clients: int
    jobs: int
    rows_per_txn: int = 1
    prefill: int = 0  # rows inserted (and vacuumed) before the capture is installed

    @property
    def unit(self) -> str:
        return "rows/s" if self.rows_per_txn > 1 else "TPS"


INSERT_ONE = """\
\\set uid random(1, 100000)
\\set qty random(1, 10)
insert into shop_order (user_id, product, quantity) values (:uid, 'widget', :qty);
"""

INSERT_BATCH = """\
insert into shop_order (user_id, product, quantity)
select (random() * 100000)::bigint, 'widget-' || g, 1 + g % 10 from generate_series(1, 100) g;
"""

UPDATE_ONE = """\
\\set id random(1, 100000)
update shop_order set quantity = quantity + 1 where id = :id;
"""

WORKLOADS: list[Workload] = [
    Workload("a", "INSERT 1 row, 1 client", INSERT_ONE, clients=1, jobs=1),
    Workload("b", "INSERT 1 row, 8 clients", INSERT_ONE, clients=8, jobs=2),
    Workload("c", "INSERT…SELECT 100 rows, 2 clients", INSERT_BATCH, clients=2, jobs=2,
             rows_per_txn=100),
    Workload("d", "UPDATE 1 column, 100k rows, 8 clients", UPDATE_ONE, clients=8, jobs=2,
             prefill=100_000),
]

# ---------------------------------------------------------------------------------------------
# Environment: build, machine info
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Env:
    cluster: Cluster
    repo: Path
    postsave_bin: Optional[str] = None
    postsave_skip_reason: Optional[str] = None


def build_postsave(env: Env, args: argparse.Namespace) -> None:
    target = Path(os.environ.get("CARGO_TARGET_DIR") or "/work/target")
    binary = target / "release" / "post-save"
    if not args.no_build:
        if not (env.repo / "Cargo.toml").exists():
            env.postsave_skip_reason = f"no Cargo.toml in {env.repo}"
            return
        log(f"cargo build --release (CARGO_TARGET_DIR={target}) ...")
        t0 = time.monotonic()
        r = subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=env.repo,
                           env={**os.environ, "CARGO_TARGET_DIR": str(target)},
                           capture_output=True, text=True)
        if r.returncode != 0:
            tail = "\n".join((r.stderr or r.stdout).strip().splitlines()[-15:])
            env.postsave_skip_reason = f"cargo build --release failed (exit {r.returncode})"
            log(f"{env.postsave_skip_reason}; post-save arms skipped. Last lines:\n{tail}")
            return
        log(f"build done in {time.monotonic() - t0:.0f} s")
    if not binary.exists():
        env.postsave_skip_reason = f"{binary} does not exist"
        return
    for sub in (POSTSAVE_RUN_COMMAND, *POSTSAVE_SETUP_COMMANDS):
        r = subprocess.run([str(binary), *sub, "--help"], capture_output=True, text=True,
                           timeout=30)
        out = (r.stdout + r.stderr).lower()
        if r.returncode != 0 or "usage" not in out:
            env.postsave_skip_reason = (
                f"`post-save {' '.join(sub)} --help` gives no usage text (exit {r.returncode}): "
                "the subcommand does not exist yet")
            return
    env.postsave_bin = str(binary)


def machine_info(cluster: Cluster) -> dict:
    info: dict = {"nproc": os.cpu_count(), "hostname": platform.node(),
                  "kernel": platform.release(), "python": platform.python_version()}
    try:
        info["nproc"] = int(subprocess.run(["nproc"], capture_output=True, text=True).stdout)
    except (OSError, ValueError):
        pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                kb = int(line.split()[1])
                info["mem_total_gib"] = round(kb / 1024 / 1024, 1)
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info["postgres_version"] = cluster.psql("postgres", "show server_version")
    info["postgres_version_full"] = cluster.psql("postgres", "select version()")
    info["pg_settings"] = dict(
        line.split("|", 1) for line in cluster.psql("postgres", """
            select name, current_setting(name) from pg_settings
             where name in ('fsync', 'synchronous_commit', 'full_page_writes', 'wal_level',
                            'shared_buffers', 'max_wal_size', 'wal_sync_method',
                            'max_replication_slots', 'max_wal_senders') order by name
        """).splitlines())
    info["fdatasync"] = pg_test_fsync(cluster)
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE,
                             capture_output=True, text=True)
        info["git_commit"] = rev.stdout.strip() if rev.returncode == 0 else None
    except OSError:
        info["git_commit"] = None
    return info


FDATASYNC_RE = re.compile(r"^\s*fdatasync\s+([\d.]+|n/a\S*)\s+ops/sec\s+(\d+)?\s*usecs/op", re.M)


def pg_test_fsync(cluster: Cluster) -> dict:
    """fdatasync latency of the disk holding the cluster (first, one-8kB-write section)."""
    test_file = cluster.pgdata.parent / "pg_test_fsync.tmp"
    log("pg_test_fsync -s 1 (about 15 s) ...")
    try:
        r = subprocess.run([cluster.tool("pg_test_fsync"), "-s", "1", "-f", str(test_file)],
                           capture_output=True, text=True, timeout=180)
    finally:
        test_file.unlink(missing_ok=True)
    m = FDATASYNC_RE.search(r.stdout)
    if r.returncode != 0 or not m or not m.group(2):
        return {"error": f"could not parse pg_test_fsync output (exit {r.returncode})",
                "output": r.stdout[-2000:] + r.stderr[-500:]}
    return {"ops_per_sec": float(m.group(1)), "usecs_per_op": int(m.group(2)),
            "dir": str(test_file.parent)}


# ---------------------------------------------------------------------------------------------
# One measurement
# ---------------------------------------------------------------------------------------------

TPS_RE = re.compile(r"^tps = ([\d.]+) \(without initial connection time\)", re.M)
TXNS_RE = re.compile(r"^number of transactions actually processed: (\d+)", re.M)
FAILED_RE = re.compile(r"^number of failed transactions: (\d+)", re.M)
LAT_RE = re.compile(r"^latency average = ([\d.]+) ms", re.M)


def wait_for(pred: Callable[[], bool], timeout: float, what: str,
             proc: Optional[subprocess.Popen] = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise BenchError(f"{what}: background process exited early with {proc.returncode}")
        if pred():
            return
        time.sleep(0.05)
    raise BenchError(f"{what}: not ready after {timeout:.0f} s")


def stop_process(proc: subprocess.Popen, timeout: float = 10) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_cpu(pid: int, with_children: bool = False) -> float:
    """CPU seconds of a process (utime + stime; + reaped children's with with_children)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    # fields[0] is field 3 (state): utime = field 14, stime 15, cutime 16, cstime 17
    ticks = int(fields[11]) + int(fields[12])
    if with_children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / CLK_TCK


def cpu_snapshot(cluster: Cluster, extra_pids: list[int]) -> tuple[float, float]:
    """(busy CPU seconds of the whole machine, CPU seconds of the benchmark's own processes).

    Own = the postmaster with its reaped children (backends that exited) and its live children
    (auxiliary processes, backends still connected), this script's reaped children (pgbench)
    and extra_pids (a background consumer still running)."""
    with open("/proc/stat") as f:
        cpu = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal ...
    busy = (sum(cpu[:8]) - cpu[3] - cpu[4]) / CLK_TCK
    own = 0.0
    try:
        postmaster = int((cluster.pgdata / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        postmaster = None
    if postmaster:
        # A backend reaped while the live children are scanned would be missed: rescan until
        # the postmaster's reaped-children total holds still.
        for _ in range(10):
            before = proc_cpu(postmaster, with_children=True)
            live = 0.0
            for d in Path("/proc").iterdir():
                if d.name.isdigit():
                    try:
                        ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
                    except (OSError, IndexError, ValueError):
                        continue
                    if ppid == postmaster:
                        live += proc_cpu(int(d.name))
            if proc_cpu(postmaster, with_children=True) == before:
                break
        own += before + live
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    own += ru.ru_utime + ru.ru_stime + sum(proc_cpu(p, with_children=True) for p in extra_pids)
    return busy, own


def loadavg() -> Optional[float]:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def measure(env: Env, arm: Arm, wl: Workload, rnd: int, seconds: int, scratch: Path) -> dict:
    cluster = env.cluster
    db = f"bench_{wl.key}_{arm.name}"
    mdir = scratch / f"{wl.key}-{arm.name}-r{rnd}"
    mdir.mkdir(parents=True, exist_ok=True)
    ctx = Ctx(cluster, db, mdir, env.postsave_bin)
    bg: Optional[subprocess.Popen] = None
    bg_log = None
    rec: dict = {"workload": wl.key, "arm": arm.name, "round": rnd}
    try:
        cluster.create_db(db)
        ctx.psql(TABLE_SQL)
        if wl.prefill:
            ctx.psql(f"""
                insert into shop_order (user_id, product, quantity)
                select g % 1000, 'widget-' || (g % 50), 1 from generate_series(1, {wl.prefill}) g;
            """)
            ctx.psql("vacuum analyze shop_order")
        if isinstance(arm.setup, str):
            ctx.psql(arm.setup)
        elif arm.setup is not None:
            arm.setup(ctx)
        n_trig = int(ctx.psql("select count(*) from pg_trigger "
                              "where tgrelid = 'shop_order'::regclass and not tgisinternal"))
        if arm.triggers and n_trig == 0:
            raise BenchError("setup left no trigger on shop_order")
        if not arm.triggers and n_trig:
            raise BenchError(f"{n_trig} unexpected trigger(s) on shop_order")
        if arm.captured:
            before = int(ctx.psql(arm.captured))
            if before != 0:
                raise BenchError(f"{before} events captured before the run (prefill backlog)")
        ctx.psql("checkpoint")
        if arm.background:
            bg_log = open(mdir / "background.log", "w")
            bg = subprocess.Popen(arm.background(ctx), stdout=bg_log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
            if arm.ready:
                wait_for(lambda: arm.ready(ctx), 30, f"{arm.name} background", bg)
        script = mdir / "workload.sql"
        script.write_text(wl.script)
        rec["loadavg_before"] = loadavg()
        bg_pids = [bg.pid] if bg is not None else []
        cpu0 = cpu_snapshot(cluster, bg_pids)
        t0 = time.monotonic()
        r = subprocess.run(
            [cluster.tool("pgbench"), "-h", cluster.host, "-p", str(cluster.port), "-U", "postgres",
             "-n", "-M", "prepared", "-T", str(seconds), "-c", str(wl.clients), "-j", str(wl.jobs),
             "-f", str(script), db],
            capture_output=True, text=True, timeout=seconds + 120)
        rec["wall_s"] = round(time.monotonic() - t0, 2)
        time.sleep(0.2)  # let pgbench's backends exit and be reaped
        cpu1 = cpu_snapshot(cluster, bg_pids)
        rec["loadavg_after"] = loadavg()
        # CPU the benchmark used, and CPU that other processes took from it meanwhile
        rec["cpu_own_s"] = round(cpu1[1] - cpu0[1], 2)
        rec["cpu_other_s"] = round(max(0.0, (cpu1[0] - cpu0[0]) - (cpu1[1] - cpu0[1])), 2)
        (mdir / "pgbench.out").write_text(r.stdout + r.stderr)
        m = TPS_RE.search(r.stdout)
        if r.returncode != 0 or not m:
            tail = "\n".join((r.stdout + r.stderr).strip().splitlines()[-8:])
            raise BenchError(f"pgbench exited {r.returncode}:\n{tail}")
        tps = float(m.group(1))
        txns = int(TXNS_RE.search(r.stdout).group(1))
        failed = FAILED_RE.search(r.stdout)
        lat = LAT_RE.search(r.stdout)
        rec.update(tps=tps, rate=tps * wl.rows_per_txn, transactions=txns,
                   rows=txns * wl.rows_per_txn,
                   failed_transactions=int(failed.group(1)) if failed else 0,
                   latency_avg_ms=float(lat.group(1)) if lat else None)
        if bg is not None and bg.poll() is not None:
            raise BenchError(f"background process died during the run (exit {bg.returncode}); "
                             f"see {mdir / 'background.log'}")
        ctx.rows = rec["rows"]
        ctx.end_lsn = ctx.psql("select pg_current_wal_lsn()")
        if arm.drained:
            rec["drain_s"] = wait_drained(ctx, arm, DRAIN_TIMEOUT)
        # Sanity check: the capture saw every row written (catches a silently broken arm).
        if arm.captured_from_listener:
            stop_process(bg)
            rec["captured"] = read_count(mdir / "listener.count")
        elif arm.captured:
            rec["captured"] = int(ctx.psql(arm.captured))
        if "captured" in rec and rec["captured"] != rec["rows"]:
            raise BenchError(f"captured {rec['captured']} events for {rec['rows']} rows written")
        rec["ok"] = True
    except (BenchError, subprocess.TimeoutExpired, OSError) as e:
        rec["ok"] = False
        rec["error"] = str(e)
        if bg is not None:
            stop_process(bg)
            tail = tail_of(mdir / "background.log")
            if tail:
                rec["error"] += f"\n--- background process output ---\n{tail}"
    finally:
        if bg is not None:
            stop_process(bg)
        if bg_log is not None:
            bg_log.close()
        if arm.teardown:
            try:
                arm.teardown(ctx)
            except BenchError as e:
                if rec.get("ok"):
                    rec["ok"] = False
                    rec["error"] = f"teardown: {e}"
        try:
            cluster.drop_db(db)
        except BenchError as e:
            rec.setdefault("cleanup_error", str(e))
    if rec["ok"]:
        shutil.rmtree(mdir, ignore_errors=True)
    return rec


def tail_of(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""


def read_count(path: Path) -> int:
    try:
        return int(path.read_text().strip() or 0)
    except (OSError, ValueError):
        return -1


DRAIN_TIMEOUT = 120.0


def wait_drained(ctx: Ctx, arm: Arm, timeout: float) -> Optional[float]:
    """Seconds the background consumer needed after the run to catch up; None on timeout."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if arm.drained(ctx):
            return round(time.monotonic() - t0, 2)
        time.sleep(0.05)
    log(f"{arm.name}: consumer still behind {timeout:.0f} s after the run")
    return None


# ---------------------------------------------------------------------------------------------
# Aggregation and report
# ---------------------------------------------------------------------------------------------


def aggregate(records: list[dict], arms: list[Arm], workloads: list[Workload]) -> list[dict]:
    out = []
    for wl in workloads:
        plain = {r["round"]: r["rate"] for r in records
                 if r["workload"] == wl.key and r["arm"] == "plain" and r.get("ok")}
        for arm in arms:
            rs = [r for r in records if r["workload"] == wl.key and r["arm"] == arm.name]
            if not rs:
                continue
            ok = [r for r in rs if r.get("ok")]
            rates = [r["rate"] for r in ok]
            ratios = [r["rate"] / plain[r["round"]] for r in ok if plain.get(r["round"])]
            out.append({
                "workload": wl.key, "arm": arm.name, "unit": wl.unit,
                "rounds_ok": len(ok), "rounds_failed": len(rs) - len(ok),
                "rates": [round(x, 1) for x in rates],
                "rate_mean": statistics.fmean(rates) if rates else None,
                "rate_stdev": statistics.stdev(rates) if len(rates) > 1 else None,
                "ratios": [round(x, 4) for x in ratios],
                "ratio_mean": statistics.fmean(ratios) if ratios else None,
                "ratio_min": min(ratios) if ratios else None,
                "ratio_max": max(ratios) if ratios else None,
                "ratio_stdev": statistics.stdev(ratios) if len(ratios) > 1 else None,
                "drain_s_max": max((r["drain_s"] for r in ok if r.get("drain_s") is not None),
                                   default=None),
                "drain_timeouts": sum(1 for r in ok if "drain_s" in r and r["drain_s"] is None),
            })
    return out


def fmt_rate(x: Optional[float]) -> str:
    if x is None:
        return "—"
    return f"{x / 1000:.1f}k" if x >= 10_000 else f"{x:,.0f}"


def fmt_ratio_cell(a: dict) -> str:
    if a["ratio_mean"] is None:
        return "failed" if a["rounds_failed"] else "—"
    s = f"{a['ratio_mean']:.2f}"
    if len(a["ratios"]) > 1:
        s += f" ({a['ratio_min']:.2f}–{a['ratio_max']:.2f})"
    if a["rounds_failed"]:
        s += f" [{a['rounds_failed']} failed]"
    return s


def interference(result: dict) -> str:
    """One line on how much CPU other processes took during the measurements."""
    ms = [r for r in result["measurements"] if r.get("cpu_other_s") is not None]
    if not ms:
        return "CPU used by other processes during the measurements: n/a."
    ncpu = result["machine"].get("nproc") or 1
    share = sorted(r["cpu_other_s"] / (r["wall_s"] * ncpu) for r in ms)
    median = share[len(share) // 2]
    worst = max(ms, key=lambda r: r["cpu_other_s"] / (r["wall_s"] * ncpu))
    line = (f"CPU taken by processes outside the benchmark during the measurements: median "
            f"{median:.0%}, worst {share[-1]:.0%} of the machine (workload {worst['workload']}, "
            f"`{worst['arm']}`, round {worst['round']}).")
    if share[-1] > 0.10:
        line += (" **Something else was running: treat figures from those measurements with "
                 "suspicion (per-measurement `cpu_other_s` in the JSON).**")
    return line


def render_markdown(result: dict, arms: list[Arm], workloads: list[Workload]) -> str:
    mi = result["machine"]
    fs = mi.get("fdatasync", {})
    fs_txt = (f"{fs['usecs_per_op']} µs/op ({fs['ops_per_sec']:,.0f} ops/s)"
              if "usecs_per_op" in fs else "n/a")
    agg = {(a["workload"], a["arm"]): a for a in result["aggregates"]}
    lines = [
        f"# Capture cost, {result['started_utc']}",
        "",
        f"`{' '.join(['bench/run', *result['argv']])}` · {result['rounds']} round(s) × "
        f"{result['seconds']} s per measurement · arms alternate within each round",
        "",
        f"Machine: {mi.get('nproc')} CPUs ({mi.get('cpu_model', '?')}), "
        f"{mi.get('mem_total_gib', '?')} GiB RAM, PostgreSQL {mi.get('postgres_version')}, "
        f"fdatasync {fs_txt}; fsync=on, synchronous_commit=on, full_page_writes=on, "
        f"wal_level=logical, shared_buffers={mi.get('pg_settings', {}).get('shared_buffers', '?')}.",
        "",
        interference(result),
        "",
        "## Ratio to `plain` (mean over rounds; min–max in brackets)",
        "",
        "Each round's figure is divided by the `plain` figure of the same round and workload.",
        "",
        "| arm | " + " | ".join(f"{w.key}: {w.title}" for w in workloads) + " |",
        "|---|" + "---|" * len(workloads),
    ]
    for arm in arms:
        cells = [fmt_ratio_cell(agg[(w.key, arm.name)]) if (w.key, arm.name) in agg else "—"
                 for w in workloads]
        lines.append(f"| {arm.name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Throughput (mean ± stdev over rounds; TPS, rows/s for the 100-row batch)",
        "",
        "| arm | " + " | ".join(f"{w.key} ({w.unit})" for w in workloads) + " |",
        "|---|" + "---|" * len(workloads),
    ]
    for arm in arms:
        cells = []
        for w in workloads:
            a = agg.get((w.key, arm.name))
            if not a or a["rate_mean"] is None:
                cells.append("—" if not a or not a["rounds_failed"] else "failed")
                continue
            c = fmt_rate(a["rate_mean"])
            if a["rate_stdev"] is not None:
                c += f" ± {fmt_rate(a['rate_stdev'])}"
            cells.append(c)
        lines.append(f"| {arm.name} | " + " | ".join(cells) + " |")
    lines += ["", "## Arms", ""]
    lines += [f"* `{a.name}`: {a.stands_for}" for a in arms]
    drains = [a for a in result["aggregates"] if a.get("drain_s_max") is not None
              or a.get("drain_timeouts")]
    if drains:
        lines += ["", "## Consumer catch-up after the run (s, worst round; not part of the rate)",
                  "", "| arm | " + " | ".join(w.key for w in workloads) + " |",
                  "|---|" + "---|" * len(workloads)]
        for arm in arms:
            if not arm.drained:
                continue
            cells = []
            for w in workloads:
                a = agg.get((w.key, arm.name))
                if not a:
                    cells.append("—")
                elif a.get("drain_timeouts"):
                    cells.append(f"> {DRAIN_TIMEOUT:.0f}")
                elif a.get("drain_s_max") is not None:
                    cells.append(f"{a['drain_s_max']:.2f}")
                else:
                    cells.append("—")
            lines.append(f"| {arm.name} | " + " | ".join(cells) + " |")
    if result["skipped"]:
        lines += ["", "## Skipped", ""]
        lines += [f"* `{s['arm']}`: {s['reason']}" for s in result["skipped"]]
    if result["failures"]:
        lines += ["", "## Failures", ""]
        for f in result["failures"]:
            err = f["error"].replace("\n", " ⏎ ")
            lines.append(f"* workload {f['workload']}, `{f['arm']}`, round {f['round']}: {err}")
    lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def interrupt(signum, _frame):
    """First INT/TERM: unwind (the finally blocks stop consumers and drop databases);
    later ones are ignored so that the cleanup itself is not interrupted."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: list[str]) -> int:
    if argv and argv[0] == "listen":
        return listen_main(argv[1:])
    args = parse_args(argv)
    if args.check_args:
        return 0
    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)
    cluster = Cluster.from_env()
    env = Env(cluster, Path(os.environ.get("BENCH_REPO") or HERE.parent))
    started = dt.datetime.now(dt.timezone.utc)
    stamp = started.strftime("%Y%m%dT%H%M%SZ")

    wanted = set(args.arm_names)
    if wanted & {"postsave_notify", "postsave_durable"}:
        build_postsave(env, args)
    machine = machine_info(cluster)

    arms, skipped = [], []
    for arm in ARMS:
        if arm.name not in wanted:
            continue
        reason = arm.available(env) if arm.available else None
        if reason:
            log(f"skipping {arm.name}: {reason}")
            skipped.append({"arm": arm.name, "reason": reason})
        else:
            arms.append(arm)
    workloads = [w for w in WORKLOADS if w.key in args.workload_keys]

    scratch = Path(tempfile.mkdtemp(prefix="measure-", dir=cluster.work))
    os.chmod(scratch, 0o755)
    records: list[dict] = []
    total = len(workloads) * args.rounds * len(arms)
    n = 0
    for wl in workloads:
        for rnd in range(1, args.rounds + 1):
            # rotate by one per round: every arm changes position, and consecutive measurements
            # of the same arm always have the other arms between them
            k = (rnd - 1) % len(arms)
            for arm in arms[k:] + arms[:k]:
                n += 1
                rec = measure(env, arm, wl, rnd, args.seconds, scratch)
                records.append(rec)
                if rec["ok"]:
                    log(f"[{n}/{total}] {wl.key} r{rnd} {arm.name:<17} "
                        f"{rec['rate']:>10,.0f} {wl.unit}")
                else:
                    log(f"[{n}/{total}] {wl.key} r{rnd} {arm.name:<17} FAILED: {rec['error']}")

    failures = [{k: r.get(k) for k in ("workload", "arm", "round", "error")}
                for r in records if not r.get("ok")]
    if args.require_postsave:
        failures += [{"workload": "-", "arm": s["arm"], "round": "-", "error": s["reason"]}
                     for s in skipped]
    result = {
        "started_utc": started.strftime("%Y-%m-%d %H:%M:%SZ"),
        "argv": argv,
        "quick": args.quick,
        "rounds": args.rounds,
        "seconds": args.seconds,
        "machine": machine,
        "arms": [{"name": a.name, "stands_for": a.stands_for} for a in arms],
        "workloads": [{"key": w.key, "title": w.title, "clients": w.clients, "jobs": w.jobs,
                       "rows_per_txn": w.rows_per_txn, "prefill": w.prefill, "unit": w.unit,
                       "script": w.script} for w in workloads],
        "skipped": skipped,
        "failures": failures,
        "measurements": records,
        "aggregates": aggregate(records, arms, workloads),
    }
    md = render_markdown(result, arms, workloads)

    out = args.out
    if out is None:
        out = Path(tempfile.mkdtemp(prefix="post-save-bench-results-")) if args.quick \
            else HERE / "results"
    out.mkdir(parents=True, exist_ok=True)
    md_path, json_path = out / f"capture-{stamp}.md", out / f"capture-{stamp}.json"
    md_path.write_text(md)
    json_path.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print(md)
    log(f"wrote {md_path} and {json_path}")
    if failures:
        log(f"{len(failures)} measurement(s) failed; exit 1")
        return 1
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt as e:
        log(f"interrupted ({e.args[0] if e.args else 'SIGINT'}); nothing written")
        sys.exit(130)
