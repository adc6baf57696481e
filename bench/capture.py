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
import math
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
import urllib.request
from pathlib import Path
from typing import Callable, Optional

HERE = Path(__file__).resolve().parent
PHASES = ("capture", "pipeline")

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
                   help="1 round of 2 s per measurement, 3 s latency run, 20,000-row drain "
                   "backlogs; results go to a temp dir unless --out")
    p.add_argument("--rounds", type=int, help="rounds per workload (default 2, --quick: 1)")
    p.add_argument("--seconds", type=int, help="pgbench -T per measurement (default 10, --quick: 2)")
    p.add_argument("--out", type=Path, help="directory for capture-<timestamp>.{md,json} "
                   "(default bench/results, --quick: a new temp dir)")
    p.add_argument("--arms", help="comma-separated subset of arms (plain and the floors of "
                   "the arms named are always added)")
    p.add_argument("--workloads", help="comma-separated subset of workloads: "
                   + ",".join(w.key for w in WORKLOADS))
    p.add_argument("--phases", default="capture,pipeline",
                   help="comma-separated phases to run: capture (the arms × workloads), "
                   "pipeline (post-save's latency, drain, CPU and RSS) (default: both)")
    p.add_argument("--latency-seconds", type=int,
                   help=f"pgbench -T of the pipeline's latency run at {PIPELINE_RATE} events/s "
                   "(default 20, --quick: 3)")
    p.add_argument("--backlog", type=int,
                   help="rows (events) in each of the pipeline's two drain backlogs, written as "
                   "single-row transactions and as 100-row statements "
                   "(default 200000, --quick: 20000)")
    p.add_argument("--no-build", action="store_true",
                   help="do not run cargo build; use an existing post-save binary if any")
    p.add_argument("--require-postsave", action="store_true",
                   help="fail (instead of skipping) when the post-save arms or the pipeline "
                   "phase cannot run")
    p.add_argument("--check-args", action="store_true", help=argparse.SUPPRESS)
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = build_parser()
    a = p.parse_args(argv)
    a.rounds = a.rounds if a.rounds is not None else (1 if a.quick else 2)
    a.seconds = a.seconds if a.seconds is not None else (2 if a.quick else 10)
    a.latency_seconds = (a.latency_seconds if a.latency_seconds is not None
                         else (3 if a.quick else 20))
    a.backlog = a.backlog if a.backlog is not None else (20_000 if a.quick else 200_000)
    if a.rounds < 1 or a.seconds < 1 or a.latency_seconds < 1 or a.backlog < 1:
        p.error("--rounds, --seconds, --latency-seconds and --backlog must be at least 1")
    a.phase_names = [x.strip() for x in a.phases.split(",") if x.strip()]
    bad = [x for x in a.phase_names if x not in PHASES]
    if bad or not a.phase_names:
        p.error(f"unknown phase(s): {', '.join(bad) or '(none)'} (known: {', '.join(PHASES)})")
    known_arms = {arm.name for arm in ARMS}
    if a.arms:
        wanted = [x.strip() for x in a.arms.split(",") if x.strip()]
        bad = [x for x in wanted if x not in known_arms]
        if bad:
            p.error(f"unknown arm(s): {', '.join(bad)} (known: {', '.join(sorted(known_arms))})")
        # plain is the denominator of every ratio, and a figure is read beside its floor:
        # both run whatever was named
        floors = {arm.name: arm.floor for arm in ARMS}
        wanted += [f for x in wanted if (f := floors.get(x)) and f not in wanted]
        a.arm_names = ["plain"] + [x for x in wanted if x != "plain"]
    else:
        # experiments run only when named in --arms
        a.arm_names = [arm.name for arm in ARMS if arm.name not in OPT_IN_ARMS]
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
    floor       the reference arm doing the least work of the same kind (an empty trigger for a
                trigger capture, the bare pgoutput stream for a WAL reader): the report sets the
                arm beside it, and naming the arm in --arms runs its floor too
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
    floor: Optional[str] = None


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


# --- floors: what any trigger-based capture with a WAL consumer cannot beat ---------------------
#
# Not peers: reference arms. `trigger_floor` is an empty PL/pgSQL row trigger while a pgoutput
# slot (empty publication) is read: the floor every trigger capture is reported beside.
# `emit_floor` is the cheapest trigger capture that keeps the row: row_to_json(NEW) written to
# WAL only with pg_logical_emit_message (no table, no index, no NOTIFY), read from the same kind
# of slot.

FLOOR_SLOT = "floor_slot"
FLOOR_PUBLICATION = "floor_none"

TRIGGER_FLOOR_SQL = """
create function bench_floor() returns trigger language plpgsql as $$
begin
    return null;
end $$;
create trigger bench_capture after insert or update on shop_order
    for each row execute function bench_floor();
"""

EMIT_FLOOR_SQL = """
create function bench_floor() returns trigger language plpgsql as $$
begin
    perform pg_logical_emit_message(true, 'bench', row_to_json(NEW)::text);
    return null;
end $$;
create trigger bench_capture after insert or update on shop_order
    for each row execute function bench_floor();
"""


def floor_setup(sql: str) -> Callable[[Ctx], None]:
    def setup(ctx: Ctx) -> None:
        ctx.psql(sql)
        ctx.psql(f"create publication {FLOOR_PUBLICATION}")
        ctx.psql(f"select pg_create_logical_replication_slot('{FLOOR_SLOT}', 'pgoutput')")
    return setup


def floor_argv(ctx: Ctx) -> list[str]:
    return [ctx.cluster.tool("pg_recvlogical"), *ctx.cluster.conn_args(ctx.db), "--slot", FLOOR_SLOT,
            "--start", "-o", "proto_version=1", "-o", f"publication_names={FLOOR_PUBLICATION}",
            "-o", "messages=true", "-f", "/dev/null"]


# `pgoutput_floor`: no trigger, shop_order published and its slot read with pgoutput by
# pg_recvlogical, which throws the stream away. The same server-side work as `capture = "wal"`
# (decoding, pgoutput's messages for every row, REPLICA IDENTITY FULL as post-save sets it when
# UPDATEs are captured) without post-save's daemon: the WAL capture minus the daemon.

PGOUTPUT_SLOT = "pgoutput_slot"
PGOUTPUT_PUBLICATION = "pgoutput_all"


def pgoutput_setup(ctx: Ctx) -> None:
    ctx.psql("alter table shop_order replica identity full")
    ctx.psql(f"create publication {PGOUTPUT_PUBLICATION} for table shop_order")
    ctx.psql(f"select pg_create_logical_replication_slot('{PGOUTPUT_SLOT}', 'pgoutput')")


def pgoutput_argv(ctx: Ctx) -> list[str]:
    return [ctx.cluster.tool("pg_recvlogical"), *ctx.cluster.conn_args(ctx.db), "--slot",
            PGOUTPUT_SLOT, "--start", "-o", "proto_version=1",
            "-o", f"publication_names={PGOUTPUT_PUBLICATION}", "-o", "messages=true",
            "-f", "/dev/null"]


def slot_ready(slot: str) -> Callable[[Ctx], bool]:
    def ready(ctx: Ctx) -> bool:
        return ctx.psql(f"select count(*) from pg_replication_slots "
                        f"where slot_name = '{slot}' and active") == "1"
    return ready


def slot_drained(slot: str) -> Callable[[Ctx], bool]:
    def drained(ctx: Ctx) -> bool:
        # sent_lsn of the walsender serving the slot: how far decoding has got
        return ctx.psql(f"""
            select coalesce(bool_and(r.sent_lsn >= '{ctx.end_lsn}'::pg_lsn), false)
              from pg_replication_slots s join pg_stat_replication r on r.pid = s.active_pid
             where s.slot_name = '{slot}'
        """) == "t"
    return drained


def slot_teardown(slot: str) -> Callable[[Ctx], None]:
    def teardown(ctx: Ctx) -> None:
        ctx.psql(f"select pg_terminate_backend(active_pid) from pg_replication_slots "
                 f"where slot_name = '{slot}' and active_pid is not null")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if ctx.psql(f"select count(*) from pg_replication_slots "
                        f"where slot_name = '{slot}' and active") == "0":
                break
            time.sleep(0.1)
        ctx.psql(f"select pg_drop_replication_slot(slot_name) from pg_replication_slots "
                 f"where slot_name = '{slot}'")
    return teardown


logical_ready = slot_ready(SLOT)
logical_drained = slot_drained(SLOT)
logical_teardown = slot_teardown(SLOT)


# --- post-save ---------------------------------------------------------------------------------
#
# Everything post-save specific is in this block: the config file, the setup commands, the
# daemon command line and the checks. The arms (and the pipeline phase) are skipped, with a
# message, while the binary does not answer `post-save run --help` with a usage text.
#
# The capture's SQL always comes from the binary, never from a copy kept here: a trigger
# capture is `post-save triggers sql` (the DDL `triggers install` would run for this config)
# applied with psql, then `triggers check` must agree; a WAL capture is `triggers install`,
# the only command that makes the replication slot (`triggers sql` prints no slot).

POSTSAVE_CONFIG = """\
# written by bench/capture.py for one measurement
[database]
url = "{url}"
{daemon}

[[watch]]
table = "public.shop_order"
operations = ["insert", "update"]
mode = "{mode}"
{watch_extra}

[[handler]]
name = "{handler_name}"
sender = "public.shop_order"
signal = "post_save"
kind = "log"
{handler_options}
"""

# below the default log filter (info): the handler runs for every event but prints nothing
POSTSAVE_NOOP_HANDLER = ("bench-noop", 'level = "debug"')
# one JSON line per event on stderr (with --log-format json), carrying the trigger's `at`
POSTSAVE_LATENCY_HANDLER = ("bench-latency", 'level = "info"\nfields = ["id", "at"]')

# subcommands the bench needs (checked for a usage text before the post-save arms run)
POSTSAVE_COMMANDS = [["run"], ["migrate"], ["triggers", "sql"], ["triggers", "check"],
                     ["triggers", "install"]]
POSTSAVE_RUN_COMMAND = ["run"]
# the first DDL applied per watch (mode and extra keys), for the JSON report (`postsave_ddl`)
POSTSAVE_DDL: dict[str, str] = {}


# the [[watch]] key of a durable watch read from the WAL (a pgoutput slot) instead of a trigger
POSTSAVE_WAL_WATCH = 'capture = "wal"'


def postsave_config(url: str, mode: str, handler: tuple[str, str] = POSTSAVE_NOOP_HANDLER,
                    watch_extra: str = "", daemon_extra: str = "") -> str:
    # BENCH_POSTSAVE_DAEMON: extra `[daemon]` keys for experiments, e.g. 'busy_poll = "10ms"'
    extra = "\n".join(x for x in (os.environ.get("BENCH_POSTSAVE_DAEMON", "").strip(),
                                  daemon_extra) if x)
    daemon = f"[daemon]\n{extra}\n" if extra else ""
    return POSTSAVE_CONFIG.format(url=url, mode=mode, daemon=daemon, handler_name=handler[0],
                                  handler_options=handler[1], watch_extra=watch_extra)


def postsave_argv(ctx: Ctx, sub: list[str], json_log: bool = False) -> list[str]:
    # `--config` is accepted by every subcommand (also POST_SAVE_CONFIG)
    return [ctx.postsave_bin or "post-save", *(["--log-format", "json"] if json_log else []),
            "--config", str(ctx.dir / "post-save.toml"), *sub]


def postsave_command(ctx: Ctx, sub: list[str]) -> str:
    """Run one post-save subcommand for this measurement's config; its stdout."""
    argv = postsave_argv(ctx, sub)
    r = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=postsave_env())
    if r.returncode != 0:
        raise BenchError(f"{' '.join(argv)} exited {r.returncode}: "
                         f"{(r.stderr or r.stdout).strip()[-2000:]}")
    return r.stdout


def postsave_install(ctx: Ctx, mode: str,
                     handler: tuple[str, str] = POSTSAVE_NOOP_HANDLER,
                     watch_extra: str = "", daemon_extra: str = "") -> None:
    """Write the config and install its capture with the binary: `migrate` (the post_save
    schema), then for a trigger capture the DDL of `triggers sql` applied with psql and checked
    with `triggers check`, for a WAL capture (POSTSAVE_WAL_WATCH) `triggers install`, which
    also makes the publication's slot."""
    (ctx.dir / "post-save.toml").write_text(postsave_config(ctx.cluster.url(ctx.db), mode,
                                                            handler, watch_extra, daemon_extra))
    postsave_command(ctx, ["migrate"])
    if POSTSAVE_WAL_WATCH in watch_extra:
        postsave_command(ctx, ["triggers", "install"])
        return
    ddl = postsave_command(ctx, ["triggers", "sql"])
    if not ddl.strip():
        raise BenchError("`post-save triggers sql` printed no DDL")
    POSTSAVE_DDL.setdefault(" ".join(x for x in (f'mode = "{mode}"', watch_extra) if x), ddl)
    ctx.psql(ddl)
    postsave_command(ctx, ["triggers", "check"])


def postsave_env() -> dict:
    """The daemon's environment: RUST_LOG unset, so the default filter (info) applies and the
    no-op handler's debug lines stay unprinted whatever the caller's shell exports."""
    return {k: v for k, v in os.environ.items()
            if k not in ("RUST_LOG", "POST_SAVE_CONFIG", "POST_SAVE_LOG_FORMAT", "DATABASE_URL")}


def postsave_setup(mode: str, watch_extra: str = "",
                   daemon_extra: str = "") -> Callable[[Ctx], None]:
    def setup(ctx: Ctx) -> None:
        postsave_install(ctx, mode, watch_extra=watch_extra, daemon_extra=daemon_extra)
    return setup


def postsave_run_argv(ctx: Ctx) -> list[str]:
    return postsave_argv(ctx, POSTSAVE_RUN_COMMAND)


# The daemon arms the doorbell (setval 1) once it has LISTENed and caught up with the ledger,
# in both modes; it silences it (0) when it stops. The sequence starts at 0. With capture =
# "wal" the ledger listener runs (and arms it) too, so it says nothing of the WAL stream: see
# postsave_wal_ready_sql.
POSTSAVE_READY_SQL = "select last_value from post_save.doorbell"


def postsave_ready(ctx: Ctx) -> bool:
    return ctx.psql(POSTSAVE_READY_SQL) == "1"


# Durable mode: the statement-level trigger writes one ledger row per captured statement
# (chunks of at most 1000 rows), and its column `n` holds how many events (saved rows) that
# ledger row carries. So events are counted with sum(n), never count(*): a 100-row INSERT … SELECT
# is 100 events in one ledger row. (An UPDATE row that changes nothing is no event, but every
# workload changes a column.) The daemon acknowledges ledger rows (`handled_at`).
POSTSAVE_CAPTURED_SQL = "select coalesce(sum(n), 0) from post_save.event"
# events not handled yet
POSTSAVE_PENDING_SQL = "select coalesce(sum(n), 0) from post_save.event where handled_at is null"
# "caught up" = no unacknowledged ledger row (n >= 1, so the same as pending events = 0). Polled
# every 50 ms: an existence check on the partial index event_pending_idx costs next to nothing,
# where sum(n) over a 200,000-row backlog would read the whole table on every poll and compete
# with the daemon for the machine's CPU.
POSTSAVE_ANY_PENDING_SQL = ("select exists (select 1 from post_save.event "
                            "where handled_at is null)")


def postsave_drained(ctx: Ctx) -> bool:
    return ctx.psql(POSTSAVE_ANY_PENDING_SQL) == "f"


def postsave_available(env: "Env") -> Optional[str]:
    return env.postsave_skip_reason


def postsave_wal_slot(ctx: Ctx) -> str:
    # as post_save::wal::slot_name: the database's name in lower case, other characters as _
    return "post_save_" + "".join(c.lower() if c.isascii() and c.isalnum() else "_" for c in ctx.db)[:53]


def postsave_wal_ready_sql(ctx: Ctx) -> str:
    # "1" once the daemon streams the slot (a walsender holds it): `triggers install` created
    # the slot, so rows saved before that are not lost, but their events would wait for the
    # stream and the measurement would start on a daemon still starting up
    return (f"select count(*) from pg_replication_slots "
            f"where slot_name = '{postsave_wal_slot(ctx)}' and active")


def postsave_wal_ready(ctx: Ctx) -> bool:
    return ctx.psql(postsave_wal_ready_sql(ctx)) == "1"


def postsave_wal_confirmed_sql(ctx: Ctx, lsn: str) -> str:
    # "t" once the slot is confirmed up to `lsn`: the daemon confirms a transaction once every
    # handler is done with it, and, idle, up to the server's WAL end on its keepalives (so a
    # position read after the last commit is reached too)
    return (f"select coalesce(bool_and(confirmed_flush_lsn >= '{lsn}'::pg_lsn), false) "
            f"from pg_replication_slots where slot_name = '{postsave_wal_slot(ctx)}'")


def postsave_wal_drained(ctx: Ctx) -> bool:
    return ctx.psql(postsave_wal_confirmed_sql(ctx, ctx.end_lsn)) == "t"


def postsave_wal_teardown(ctx: Ctx) -> None:
    slot_teardown(postsave_wal_slot(ctx))(ctx)


# busy_poll values (ms) of the opt-in arms postsave_durable_poll<ms>
BUSY_POLL_ARMS_MS = (10, 20, 50)

# the floors each arm is reported beside (Arm.floor)
TRIGGER_FLOOR = "trigger_floor"
WAL_FLOOR = "pgoutput_floor"

ARMS: list[Arm] = [
    Arm("plain", "no capture: the baseline of every ratio", triggers=False),
    Arm("naive_notify",
        "per-row trigger pg_notify(row_to_json(NEW)) + one LISTEN client draining "
        "(django-pgpubsub, pg_eventserv)",
        setup=NAIVE_NOTIFY_SQL, background=listener_argv, ready=listener_ready,
        drained=listener_drained, captured_from_listener=True, floor=TRIGGER_FLOOR),
    Arm("event_log",
        "per-row trigger inserting row_to_json(NEW)::jsonb + op/table into an event table "
        "(Hasura event triggers)",
        setup=EVENT_LOG_SQL, captured="select count(*) from event_log", floor=TRIGGER_FLOOR),
    Arm("pgq", "Skytools PgQ: pgq.logutriga('q') C trigger into the queue's event table",
        setup=PGQ_SQL, captured="select count(*) from pgq.event_template", floor=TRIGGER_FLOOR),
    Arm("logical",
        "no trigger: wal2json logical slot read by pg_recvlogical during the run "
        "(Debezium, Sequin, Supabase)",
        setup=logical_setup, background=logical_argv, ready=logical_ready,
        drained=logical_drained, teardown=logical_teardown, triggers=False, floor=WAL_FLOOR),
    Arm(TRIGGER_FLOOR,
        "floor of the trigger captures: an empty PL/pgSQL row trigger while a pgoutput slot is "
        "read",
        setup=floor_setup(TRIGGER_FLOOR_SQL), background=floor_argv,
        ready=slot_ready(FLOOR_SLOT), drained=slot_drained(FLOOR_SLOT),
        teardown=slot_teardown(FLOOR_SLOT)),
    Arm("emit_floor",
        "reference, not a peer: row trigger writing row_to_json(NEW) to WAL only "
        "(pg_logical_emit_message), read from a pgoutput slot",
        setup=floor_setup(EMIT_FLOOR_SQL), background=floor_argv,
        ready=slot_ready(FLOOR_SLOT), drained=slot_drained(FLOOR_SLOT),
        teardown=slot_teardown(FLOOR_SLOT)),
    Arm(WAL_FLOOR,
        "floor of the WAL captures: no trigger; shop_order's pgoutput stream (as capture = "
        "\"wal\" reads it) read by pg_recvlogical and thrown away",
        setup=pgoutput_setup, background=pgoutput_argv,
        ready=slot_ready(PGOUTPUT_SLOT), drained=slot_drained(PGOUTPUT_SLOT),
        teardown=slot_teardown(PGOUTPUT_SLOT), triggers=False),
    # notify mode is at most once and keeps nothing: no capture count, no catch-up check
    Arm("postsave_notify", "post-save, watch mode = \"notify\" (daemon running)",
        setup=postsave_setup("notify"), background=postsave_run_argv, ready=postsave_ready,
        available=postsave_available, floor=TRIGGER_FLOOR),
    Arm("postsave_durable", "post-save, watch mode = \"durable\" (daemon running)",
        setup=postsave_setup("durable"), background=postsave_run_argv, ready=postsave_ready,
        drained=postsave_drained, captured=POSTSAVE_CAPTURED_SQL,
        available=postsave_available, floor=TRIGGER_FLOOR),
    # reference, not a peer: the trigger's share of the durable cost (the doorbell stays at 0
    # with no daemon, so no NOTIFY either)
    Arm("postsave_capture",
        "reference: post-save durable capture with no daemon running (the trigger's own cost)",
        setup=postsave_setup("durable"), captured=POSTSAVE_CAPTURED_SQL,
        available=postsave_available, floor=TRIGGER_FLOOR),
    Arm("postsave_durable_row",
        "post-save, durable, insert_capture = \"row\" (INSERT captured per row, not per statement)",
        setup=postsave_setup("durable", 'insert_capture = "row"'), background=postsave_run_argv,
        ready=postsave_ready, drained=postsave_drained, captured=POSTSAVE_CAPTURED_SQL,
        available=postsave_available, floor=TRIGGER_FLOOR),
    # experiments (OPT_IN_ARMS): the ledger polled less often than every 2 ms while busy
    *[Arm(f"postsave_durable_poll{ms}",
          f"post-save, durable, busy_poll = \"{ms}ms\" (the ledger read less often under load)",
          setup=postsave_setup("durable", daemon_extra=f'busy_poll = "{ms}ms"'),
          background=postsave_run_argv, ready=postsave_ready, drained=postsave_drained,
          captured=POSTSAVE_CAPTURED_SQL, available=postsave_available, floor=TRIGGER_FLOOR)
      for ms in BUSY_POLL_ARMS_MS],
    # experiment (OPT_IN_ARMS): per-row INSERT capture in notify mode
    Arm("postsave_notify_row",
        "post-save, notify, insert_capture = \"row\" (INSERT captured per row, not per statement)",
        setup=postsave_setup("notify", 'insert_capture = "row"'), background=postsave_run_argv,
        ready=postsave_ready, available=postsave_available, floor=TRIGGER_FLOOR),
    Arm("postsave_wal",
        "post-save, durable, capture = \"wal\": no trigger; the daemon streams a pgoutput slot",
        setup=postsave_setup("durable", POSTSAVE_WAL_WATCH), background=postsave_run_argv,
        ready=postsave_wal_ready, drained=postsave_wal_drained, teardown=postsave_wal_teardown,
        available=postsave_available, triggers=False, floor=WAL_FLOOR),
]

# Arms that run only when named in --arms (DECISIONS.md says what they showed).
OPT_IN_ARMS = {"postsave_notify_row", *(f"postsave_durable_poll{ms}" for ms in BUSY_POLL_ARMS_MS)}



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


def cargo_target_dir(repo: Path) -> Path:
    """The clone's cargo target directory, as cargo itself resolves it (CARGO_TARGET_DIR,
    .cargo/config.toml, or <repo>/target)."""
    r = subprocess.run(["cargo", "metadata", "--format-version", "1", "--no-deps"], cwd=repo,
                       capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        raise BenchError(f"cargo metadata failed (exit {r.returncode}): {r.stderr.strip()[-500:]}")
    return Path(json.loads(r.stdout)["target_directory"])


def build_postsave(env: Env, args: argparse.Namespace) -> None:
    """Build the clone's post-save (release) and check it has every subcommand the bench uses;
    on any failure set env.postsave_skip_reason instead of env.postsave_bin."""
    if not (env.repo / "Cargo.toml").exists():
        env.postsave_skip_reason = f"no Cargo.toml in {env.repo}"
        return
    try:
        target = cargo_target_dir(env.repo)
    except (BenchError, OSError, subprocess.TimeoutExpired, ValueError, KeyError) as e:
        env.postsave_skip_reason = f"cannot find the cargo target directory: {e}"
        return
    binary = target / "release" / "post-save"
    if not args.no_build:
        log(f"cargo build --release --bin post-save (target directory {target}) ...")
        t0 = time.monotonic()
        r = subprocess.run(["cargo", "build", "--release", "--quiet", "--bin", "post-save"],
                           cwd=env.repo, capture_output=True, text=True)
        if r.returncode != 0:
            tail = "\n".join((r.stderr or r.stdout).strip().splitlines()[-15:])
            env.postsave_skip_reason = f"cargo build --release failed (exit {r.returncode})"
            log(f"{env.postsave_skip_reason}; post-save arms skipped. Last lines:\n{tail}")
            return
        log(f"build done in {time.monotonic() - t0:.0f} s")
    if not binary.exists():
        env.postsave_skip_reason = f"{binary} does not exist"
        return
    for sub in POSTSAVE_COMMANDS:
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
                                  start_new_session=True, env=postsave_env())
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


def machine_busy_share(seconds: float) -> float:
    """Share of the machine's CPU busy over `seconds` (whatever runs: call it between runs)."""
    def snap() -> tuple[int, int]:
        with open("/proc/stat") as f:
            cpu = [int(x) for x in f.readline().split()[1:]]
        return sum(cpu[:8]) - cpu[3] - cpu[4], sum(cpu[:8])
    b0, t0 = snap()
    time.sleep(seconds)
    b1, t1 = snap()
    return (b1 - b0) / max(1, t1 - t0)


def measure_when_quiet(env: Env, arm: Arm, wl: Workload, rnd: int, seconds: int,
                       scratch: Path) -> dict:
    """measure(), gated on a quiet machine when BENCH_QUIET="share,wait_s,retries" is set (an
    experiment aid for a shared machine, off by default): wait up to wait_s until the machine
    is less than `share` busy before the measurement, and measure again (up to `retries` times)
    when other processes took more than `share` of the machine during it. The record keeps
    quiet_wait_s and the shares of the discarded attempts."""
    spec = os.environ.get("BENCH_QUIET", "").strip()
    if not spec:
        return measure(env, arm, wl, rnd, seconds, scratch)
    share, wait_s, retries = (float(x) for x in spec.split(","))
    discarded: list[float] = []
    waited = 0.0
    while True:
        t0 = time.monotonic()
        while time.monotonic() - t0 < wait_s and machine_busy_share(1.0) >= share:
            pass
        waited += time.monotonic() - t0
        rec = measure(env, arm, wl, rnd, seconds, scratch)
        other = (rec["cpu_other_s"] / (rec["wall_s"] * (os.cpu_count() or 1))
                 if rec.get("ok") and rec.get("wall_s") else 0.0)
        if other < share or len(discarded) >= retries:
            break
        discarded.append(round(other, 3))
        log(f"{wl.key} r{rnd} {arm.name}: other processes took {other:.0%}; measuring again")
    rec["quiet_wait_s"] = round(waited, 1)
    rec["discarded_other_shares"] = discarded
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
# Pipeline phase: post-save's daemon end to end (latency, backlog drain, CPU, memory)
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class PipelineMode:
    """One way post-save captures the saves, as the pipeline phase runs it.

    name   its key in the JSON (modes.<name>) and in database and directory names
    label  how the report names it
    watch  the [[watch]]'s `mode`
    wal    capture = "wal": durable, read from a logical slot; no trigger and no ledger
    """

    name: str
    label: str
    watch: str
    wal: bool = False

    @property
    def watch_extra(self) -> str:
        return POSTSAVE_WAL_WATCH if self.wal else ""

    @property
    def durable(self) -> bool:
        """At least once: every row is handled exactly once here, and a backlog drains."""
        return self.watch == "durable"


PIPELINE_MODES = [
    PipelineMode("durable", "durable (trigger)", "durable"),
    PipelineMode("wal", "durable (wal)", "durable", wal=True),
    PipelineMode("notify", "notify", "notify"),
]
PIPELINE_RATE = 1000  # offered events/s (pgbench -R, over all clients) for the latency run
PIPELINE_CLIENTS = 2
# The drain backlog is written by pgbench with the daemon stopped, in two cases (one database
# each): "single", one single-row INSERT per transaction (one ledger row per event: the hard
# case), and "batch", INSERT … SELECT of 100 rows per
# statement (one ledger row per 100 events). With capture = "wal" there is no ledger; the slot
# streams one transaction per statement, of 1 or 100 changes.
BACKLOG_CLIENTS = 8
BACKLOG_JOBS = 2
DRAIN_CASES = [("single", 1), ("batch", 100)]  # (case, rows per statement/transaction)
# where each case's figures go in the JSON (modes.<durable mode>.<key>)
DRAIN_KEYS = {"single": "drain", "batch": "drain_batch"}
IDLE_S = 2.0  # how long the daemon runs with nothing to handle before its idle RSS is read
POLL_S = 0.05
SCHEDULE_LAG_RE = re.compile(r"^rate limit schedule lag: avg ([\d.]+) \(max ([\d.]+)\) ms", re.M)


class PgConn:
    """A minimal protocol-v3 simple-query client over the unix socket (trust auth), so that
    polling every 50 ms does not start a psql process (and its backend) every time."""

    def __init__(self, cluster: Cluster, db: str, application_name: str = "bench-poll"):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(60)
        self.sock.connect(f"{cluster.host}/.s.PGSQL.{cluster.port}")
        self.buf = bytearray()
        params = b"".join(k + b"\0" + v.encode() + b"\0" for k, v in [
            (b"user", "postgres"), (b"database", db), (b"application_name", application_name)])
        body = struct.pack("!i", 196608) + params + b"\0"
        self.sock.sendall(struct.pack("!i", len(body) + 4) + body)
        self._until_ready(startup=True)

    def _message(self) -> tuple[int, bytes]:
        while True:
            if len(self.buf) >= 5:
                (length,) = struct.unpack_from("!i", self.buf, 1)
                if len(self.buf) >= 1 + length:
                    t, payload = self.buf[0], bytes(self.buf[5:1 + length])
                    del self.buf[:1 + length]
                    return t, payload
            chunk = self.sock.recv(65536)
            if not chunk:
                raise BenchError("poll connection: closed by the server")
            self.buf.extend(chunk)

    @staticmethod
    def _error_text(payload: bytes) -> str:
        fields = {f[:1]: f[1:] for f in payload.split(b"\0") if f}
        return fields.get(b"M", payload).decode(errors="replace")

    def _until_ready(self, startup: bool = False) -> list[list[Optional[str]]]:
        rows: list[list[Optional[str]]] = []
        error = None
        while True:
            t, payload = self._message()
            if t == ord("D"):
                (n,) = struct.unpack_from("!h", payload, 0)
                pos, row = 2, []
                for _ in range(n):
                    (ln,) = struct.unpack_from("!i", payload, pos)
                    pos += 4
                    if ln < 0:
                        row.append(None)
                    else:
                        row.append(payload[pos:pos + ln].decode())
                        pos += ln
                rows.append(row)
            elif t == ord("E"):
                if startup:
                    raise BenchError(f"poll connection: {self._error_text(payload)}")
                error = error or payload
            elif t == ord("R") and struct.unpack("!i", payload[:4])[0] != 0:
                raise BenchError("poll connection: the server asks for a password; "
                                 "the cluster must use trust")
            elif t == ord("Z"):
                if error is not None:
                    raise BenchError(f"query failed: {self._error_text(error)}")
                return rows

    def query(self, sql: str) -> list[list[Optional[str]]]:
        q = sql.encode() + b"\0"
        self.sock.sendall(b"Q" + struct.pack("!i", len(q) + 4) + q)
        return self._until_ready()

    def scalar(self, sql: str) -> Optional[str]:
        rows = self.query(sql)
        return rows[0][0] if rows and rows[0] else None

    def close(self) -> None:
        try:
            self.sock.sendall(b"X" + struct.pack("!i", 4))
        except OSError:
            pass
        self.sock.close()


def proc_status_mb(pid: int, key: str) -> Optional[float]:
    """A memory line of /proc/<pid>/status (VmRSS, VmHWM, …) in MB (MiB)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return round(int(line.split()[1]) / 1024, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def percentile(sorted_xs: list[float], p: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    k = math.ceil(round(len(sorted_xs) * p / 100, 6))  # ceil(n·p/100)
    return sorted_xs[min(max(k, 1), len(sorted_xs)) - 1]


def start_daemon(ctx: Ctx, log_path: Path, json_log: bool) -> subprocess.Popen:
    with open(log_path, "w") as f:
        return subprocess.Popen(postsave_argv(ctx, POSTSAVE_RUN_COMMAND, json_log=json_log),
                                stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                env=postsave_env())


def count_save_lines(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return f.read().count(b'"message":"save event"')
    except OSError:
        return 0


def parse_latency_log(path: Path) -> tuple[list[float], list, int]:
    """(latencies in ms, event ids, lines that did not parse) from the daemon's JSON log.

    A handled event is one line like
    {"timestamp":"…Z","level":"INFO","message":"save event","handler":…,
     "event":"{\\"id\\":1,\\"at\\":\\"…+00:00\\"}",…}: `timestamp` is when the handler logged
    it, `at` the trigger's clock_timestamp()."""
    lat, ids, bad = [], [], 0
    with open(path, errors="replace") as f:
        for line in f:
            if '"save event"' not in line:
                continue
            try:
                obj = json.loads(line)
                if obj.get("message") != "save event":
                    continue
                ev = json.loads(obj["event"])
                handled = dt.datetime.fromisoformat(obj["timestamp"])
                at = dt.datetime.fromisoformat(ev["at"])
            except (ValueError, KeyError, TypeError):
                bad += 1
                continue
            lat.append((handled - at).total_seconds() * 1000)
            ids.append(ev.get("id"))
    return lat, ids, bad


def pipeline_ready_sql(ctx: Ctx, pm: PipelineMode) -> str:
    """A query answering "1" once the daemon is ready for the mode's events."""
    return postsave_wal_ready_sql(ctx) if pm.wal else POSTSAVE_READY_SQL


def pipeline_teardown(ctx: Ctx, pm: PipelineMode, rec: dict) -> None:
    """Drop the step's database (a wal mode's slot first: a database with a slot cannot be
    dropped, and the slot would keep the cluster's WAL)."""
    steps = [postsave_wal_teardown] if pm.wal else []
    for step in steps + [lambda c: c.cluster.drop_db(c.db)]:
        try:
            step(ctx)
        except BenchError as e:
            rec.setdefault("cleanup_error", str(e))


def pipeline_failed(rec: dict, e: Exception, proc: Optional[subprocess.Popen],
                    log_path: Path) -> None:
    """Records why a pipeline step failed, with the end of the daemon's output if it ran."""
    rec["ok"] = False
    rec["error"] = str(e)
    if proc is not None:
        stop_process(proc)
        tail = tail_of(log_path)
        if tail:
            rec["error"] += f"\n--- daemon output ---\n{tail}"


def pipeline_step_end(ctx: Ctx, pm: PipelineMode, rec: dict, proc: Optional[subprocess.Popen],
                      conn: Optional[PgConn]) -> None:
    """Closes the step's connection, stops its daemon, drops its database; keeps its directory
    (the daemon's log) only when the step failed."""
    if conn is not None:
        conn.close()
    if proc is not None:
        stop_process(proc)
    pipeline_teardown(ctx, pm, rec)
    if rec.get("ok"):
        shutil.rmtree(ctx.dir, ignore_errors=True)


def pipeline_latency(env: Env, pm: PipelineMode, seconds: int, scratch: Path) -> dict:
    """Save → handler latency at PIPELINE_RATE events/s; also the daemon's idle RSS."""
    cluster = env.cluster
    mode = pm.name
    db = f"pipeline_latency_{mode}"
    ctx = Ctx(cluster, db, scratch / f"latency-{mode}", env.postsave_bin)
    ctx.dir.mkdir(parents=True, exist_ok=True)
    rec: dict = {"mode": mode, "rate": PIPELINE_RATE, "clients": PIPELINE_CLIENTS,
                 "seconds": seconds}
    proc: Optional[subprocess.Popen] = None
    conn: Optional[PgConn] = None
    log_path = ctx.dir / "daemon.log"
    try:
        cluster.create_db(db)
        ctx.psql(TABLE_SQL)
        postsave_install(ctx, pm.watch, POSTSAVE_LATENCY_HANDLER, pm.watch_extra)
        ctx.psql("checkpoint")
        proc = start_daemon(ctx, log_path, json_log=True)
        conn = PgConn(cluster, db)
        t_start = time.monotonic()
        ready_sql = pipeline_ready_sql(ctx, pm)
        wait_for(lambda: conn.scalar(ready_sql) == "1", 30,
                 f"pipeline {mode}: daemon readiness "
                 f"({'slot streamed' if pm.wal else 'doorbell armed'})", proc)
        rec["ready_s"] = round(time.monotonic() - t_start, 3)
        # idle: the daemon has been up IDLE_S with nothing to do
        time.sleep(max(0.0, IDLE_S - (time.monotonic() - t_start)))
        rec["rss_idle_mb"] = proc_status_mb(proc.pid, "VmRSS")
        rec["cpu_idle_s"] = round(proc_cpu(proc.pid), 3)
        script = ctx.dir / "insert.sql"
        script.write_text(INSERT_ONE)
        cpu0 = cpu_snapshot(cluster, [proc.pid])
        d0 = proc_cpu(proc.pid)
        t0 = time.monotonic()
        r = subprocess.run(
            [cluster.tool("pgbench"), "-h", cluster.host, "-p", str(cluster.port), "-U", "postgres",
             "-n", "-M", "prepared", "-R", str(PIPELINE_RATE), "-c", str(PIPELINE_CLIENTS),
             "-j", str(PIPELINE_CLIENTS), "-T", str(seconds), "-f", str(script), db],
            capture_output=True, text=True, timeout=seconds + 120)
        rec["wall_s"] = round(time.monotonic() - t0, 2)
        (ctx.dir / "pgbench.out").write_text(r.stdout + r.stderr)
        m = TXNS_RE.search(r.stdout)
        if r.returncode != 0 or not m:
            tail = "\n".join((r.stdout + r.stderr).strip().splitlines()[-8:])
            raise BenchError(f"pgbench exited {r.returncode}:\n{tail}")
        rows = int(m.group(1))
        tps = TPS_RE.search(r.stdout)
        lag = SCHEDULE_LAG_RE.search(r.stdout)
        lat_avg = LAT_RE.search(r.stdout)
        rec.update(rows=rows, tps=float(tps.group(1)) if tps else None,
                   pgbench_latency_avg_ms=float(lat_avg.group(1)) if lat_avg else None,
                   schedule_lag_avg_ms=float(lag.group(1)) if lag else None,
                   schedule_lag_max_ms=float(lag.group(2)) if lag else None)
        # let the daemon finish what was written, then take its figures before it stops
        t_end = time.monotonic()
        if pm.wal:  # every row's commit ends before the WAL position of now
            confirmed_sql = postsave_wal_confirmed_sql(ctx, conn.scalar(
                "select pg_current_wal_lsn()"))
            wait_for(lambda: conn.scalar(confirmed_sql) == "t", DRAIN_TIMEOUT,
                     f"pipeline {mode}: slot confirmed after the run", proc)
        elif pm.durable:
            wait_for(lambda: conn.scalar(POSTSAVE_ANY_PENDING_SQL) == "f", DRAIN_TIMEOUT,
                     f"pipeline {mode}: ledger drained after the run", proc)
        else:  # at most once: wait for every row or for the log to stop growing for 1 s
            last, last_change = -1, time.monotonic()
            while time.monotonic() - t_end < DRAIN_TIMEOUT:
                n = count_save_lines(log_path)
                if n >= rows:
                    break
                if n != last:
                    last, last_change = n, time.monotonic()
                elif time.monotonic() - last_change > 1.0:
                    break
                if proc.poll() is not None:
                    break
                time.sleep(POLL_S)
        rec["catch_up_s"] = round(time.monotonic() - t_end, 2)
        if proc.poll() is not None:
            raise BenchError(f"the daemon exited during the run (exit {proc.returncode})")
        time.sleep(0.2)  # let pgbench's backends exit and be reaped
        cpu1 = cpu_snapshot(cluster, [proc.pid])
        rec["daemon_cpu_s"] = round(proc_cpu(proc.pid) - d0, 3)
        rec["rss_load_peak_mb"] = proc_status_mb(proc.pid, "VmHWM")
        rec["cpu_own_s"] = round(cpu1[1] - cpu0[1], 2)
        rec["cpu_other_s"] = round(max(0.0, (cpu1[0] - cpu0[0]) - (cpu1[1] - cpu0[1])), 2)
        rec["wall_all_s"] = round(time.monotonic() - t0, 2)
        stop_process(proc)
        lat, ids, bad = parse_latency_log(log_path)
        if bad:
            raise BenchError(f"{bad} `save event` log line(s) without a parsable timestamp, "
                             f"event.at (see {log_path})")
        rec["handled"] = len(lat)
        if pm.durable:  # wal: the id is the change's LSN, distinct per row too
            distinct = len(set(ids))
            if len(lat) != rows or distinct != rows:
                raise BenchError(f"handled {len(lat)} events ({distinct} distinct ids) for "
                                 f"{rows} rows written")
        else:
            if len(lat) > rows or len(lat) == 0:
                raise BenchError(f"handled {len(lat)} events for {rows} rows written")
            rec["lost"] = rows - len(lat)
        xs = sorted(lat)
        rec.update(p50_ms=round(percentile(xs, 50), 3), p99_ms=round(percentile(xs, 99), 3),
                   p999_ms=round(percentile(xs, 99.9), 3), max_ms=round(xs[-1], 3),
                   min_ms=round(xs[0], 3), mean_ms=round(statistics.fmean(xs), 3),
                   over_10ms=sum(1 for x in xs if x > 10))
        if rows:
            rec["daemon_cpu_s_per_10k"] = round(rec["daemon_cpu_s"] / rows * 10_000, 3)
        rec["ok"] = True
    except (BenchError, subprocess.TimeoutExpired, OSError) as e:
        pipeline_failed(rec, e, proc, log_path)
    finally:
        pipeline_step_end(ctx, pm, rec, proc, conn)
    return rec


def insert_script(rows: int) -> str:
    """A pgbench script writing `rows` rows in one statement (one transaction)."""
    if rows == 1:
        return INSERT_ONE
    return ("insert into shop_order (user_id, product, quantity)\n"
            f"select (random() * 100000)::bigint, 'widget-' || g, 1 + g % 10 "
            f"from generate_series(1, {rows}) g;\n")


def write_backlog(ctx: Ctx, rows: int, per_stmt: int) -> dict:
    """Write `rows` rows into shop_order with pgbench (`-n -M prepared -c 8 -j 2 -t …`), one
    transaction per statement of `per_stmt` rows. pgbench's -t is per client, so what does not
    divide evenly is written by one more client afterwards (nothing with the defaults)."""
    cluster = ctx.cluster
    stmts, rest = divmod(rows, per_stmt)
    clients = min(BACKLOG_CLIENTS, stmts)
    runs = []  # (clients, transactions per client, rows per transaction)
    if clients:
        runs.append((clients, stmts // clients, per_stmt))
        if stmts % clients:
            runs.append((1, stmts % clients, per_stmt))
    if rest:
        runs.append((1, 1, rest))
    out, txns = [], 0
    t0 = time.monotonic()
    for i, (c, t, n) in enumerate(runs):
        script = ctx.dir / f"backlog-{i}.sql"
        script.write_text(insert_script(n))
        argv = [cluster.tool("pgbench"), "-h", cluster.host, "-p", str(cluster.port),
                "-U", "postgres", "-n", "-M", "prepared", "-c", str(c),
                "-j", str(min(BACKLOG_JOBS, c)), "-t", str(t), "-f", str(script), ctx.db]
        r = subprocess.run(argv, capture_output=True, text=True,
                           timeout=max(600, c * t * n / 100))
        out.append("pgbench " + " ".join(argv[7:]) + "\n" + r.stdout + r.stderr)
        m = TXNS_RE.search(r.stdout)
        if r.returncode != 0 or not m or int(m.group(1)) != c * t:
            tail = "\n".join((r.stdout + r.stderr).strip().splitlines()[-8:])
            raise BenchError(f"backlog: pgbench exited {r.returncode}:\n{tail}")
        txns += c * t
    write_s = time.monotonic() - t0
    (ctx.dir / "pgbench.out").write_text("\n".join(out))
    return {"backlog_write_s": round(write_s, 2), "statements": txns,
            "backlog_write_tps": round(txns / write_s, 1),
            "backlog_write_rows_per_s": round(rows / write_s, 1),
            "backlog_clients": clients or 1}


def free_port() -> int:
    """A TCP port of 127.0.0.1 that is free now (the daemon binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape_counters(port: int, names: list[str]) -> dict[str, int]:
    """Counters of the daemon's Prometheus endpoint (`GET /metrics`, `[daemon] metrics`), by
    name (the exposition adds `_total` to a counter's name)."""
    # a loopback endpoint: no proxy, whatever the environment's http_proxy says
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            text = r.read().decode()
    except OSError as e:  # urllib.error.URLError included
        raise BenchError(f"GET http://127.0.0.1:{port}/metrics: {e}") from None
    out = {}
    for name in names:
        m = re.search(rf"^{name}(?:_total)? (\d+)$", text, re.M)
        if not m:
            raise BenchError(f"no counter {name} in the daemon's /metrics")
        out[name] = int(m.group(1))
    return out


def pipeline_drain(env: Env, pm: PipelineMode, events: int, scratch: Path, case: str,
                   per_stmt: int) -> dict:
    """Drain rate of a backlog written while the daemon was stopped (a durable mode), the
    daemon's CPU per 10,000 events and its peak RSS while draining. `case` "single" writes
    the backlog as single-row INSERT transactions, "batch" as INSERT … SELECT of `per_stmt`
    rows per statement."""
    cluster = env.cluster
    mode = pm.name
    db = f"pipeline_drain_{mode}_{case}"
    ctx = Ctx(cluster, db, scratch / f"drain-{mode}-{case}", env.postsave_bin)
    ctx.dir.mkdir(parents=True, exist_ok=True)
    rec: dict = {"mode": mode, "case": case, "events": events,
                 "rows_per_statement": per_stmt}
    proc: Optional[subprocess.Popen] = None
    conn: Optional[PgConn] = None
    log_path = ctx.dir / "daemon.log"
    try:
        cluster.create_db(db)
        ctx.psql(TABLE_SQL)
        # wal: no ledger row tells what was handled, so the daemon's own counters do (its
        # Prometheus endpoint, read once the drain is timed)
        port = free_port() if pm.wal else None
        # the no-op handler: routed, prints nothing
        postsave_install(ctx, pm.watch, watch_extra=pm.watch_extra,
                         daemon_extra=f'metrics = "127.0.0.1:{port}"' if port else "")
        # no daemon runs: the doorbell stays at 0, so the writers NOTIFY nobody (wal: the slot
        # made by the install keeps the backlog's WAL)
        rec.update(write_backlog(ctx, events, per_stmt))
        if pm.wal:
            written, ledger_rows = (int(x) for x in ctx.psql(
                "select (select count(*) from shop_order), (select count(*) from post_save.event)"
            ).split("|"))
            if written != events or ledger_rows:
                raise BenchError(f"backlog: {written} rows in shop_order, {ledger_rows} ledger "
                                 f"rows, for {events} rows written")
            # every commit of the backlog ends before this: drained once the slot is confirmed
            # up to it
            drained_sql, drained = postsave_wal_confirmed_sql(
                ctx, ctx.psql("select pg_current_wal_lsn()")), "t"
        else:
            ledger_rows, pending, written = (int(x) for x in ctx.psql(
                "select count(*), coalesce(sum(n), 0), (select count(*) from shop_order) "
                "from post_save.event where handled_at is null").split("|"))
            rec.update(ledger_rows=ledger_rows,
                       events_per_ledger_row=round(pending / ledger_rows, 2)
                       if ledger_rows else None)
            if written != events or pending != events:
                raise BenchError(f"backlog: {pending} pending events in {ledger_rows} ledger "
                                 f"rows, {written} rows in shop_order, for {events} rows written")
            # the same starting state every time (hint bits, visibility map, statistics)
            ctx.psql("vacuum analyze post_save.event")
            drained_sql, drained = POSTSAVE_ANY_PENDING_SQL, "f"
        # no checkpoint of the backlog's WAL in the middle of the drain
        ctx.psql("checkpoint")
        conn = PgConn(cluster, db)
        cpu0 = cpu_snapshot(cluster, [])
        t0 = time.monotonic()
        proc = start_daemon(ctx, log_path, json_log=False)
        deadline = t0 + max(DRAIN_TIMEOUT, events / 1000)
        polls = 0
        while True:
            if proc.poll() is not None:
                raise BenchError(f"the daemon exited while draining (exit {proc.returncode})")
            polls += 1
            if conn.scalar(drained_sql) == drained:
                break
            if time.monotonic() > deadline:
                raise BenchError(f"backlog not drained after {deadline - t0:.0f} s")
            time.sleep(POLL_S)
        drain_s = time.monotonic() - t0
        # read before it exits: CPU (all threads, utime + stime) and peak RSS
        daemon_cpu = proc_cpu(proc.pid)
        rec["rss_draining_mb"] = proc_status_mb(proc.pid, "VmHWM")
        cpu1 = cpu_snapshot(cluster, [proc.pid])
        counters = scrape_counters(port, ["post_save_deliveries_handled",
                                          "post_save_deliveries_dead"]) if port else {}
        stop_process(proc)
        rec.update(drain_s=round(drain_s, 3), polls=polls,
                   events_per_s=round(events / drain_s, 1),
                   daemon_cpu_s=round(daemon_cpu, 3),
                   daemon_cpu_s_per_10k=round(daemon_cpu / events * 10_000, 4),
                   daemon_cores=round(daemon_cpu / drain_s, 3),
                   machine_busy_cpu_s=round(cpu1[0] - cpu0[0], 2),
                   cpu_own_s=round(cpu1[1] - cpu0[1], 2),
                   cpu_other_s=round(max(0.0, (cpu1[0] - cpu0[0]) - (cpu1[1] - cpu0[1])), 2),
                   wall_s=round(drain_s, 2))
        if pm.wal:
            handled, dead_deliveries = (counters["post_save_deliveries_handled"],
                                        counters["post_save_deliveries_dead"])
            dead = int(conn.scalar("select count(*) from post_save.dead_letter"))
            rec.update(handled=handled, dead=dead_deliveries)
            if handled != events or dead_deliveries or dead:
                raise BenchError(f"after the drain: {handled} deliveries handled and "
                                 f"{dead_deliveries} dead (daemon's /metrics), {dead} dead "
                                 f"letters, for {events} events written")
        else:
            rec["ledger_rows_per_s"] = round(ledger_rows / drain_s, 1)
            handled_rows, handled, dead = (int(x) for x in conn.query(
                "select count(*), coalesce(sum(n), 0), "
                "(select count(*) from post_save.dead_letter) "
                "from post_save.event where handled_at is not null")[0])
            if handled_rows != ledger_rows or handled != events or dead:
                raise BenchError(f"after the drain: {handled} events in {handled_rows} ledger "
                                 f"rows handled, {dead} dead letters, for {events} events in "
                                 f"{ledger_rows} ledger rows written")
        rec["ok"] = True
    except (BenchError, subprocess.TimeoutExpired, OSError) as e:
        pipeline_failed(rec, e, proc, log_path)
    finally:
        pipeline_step_end(ctx, pm, rec, proc, conn)
    return rec


def drain_units(d: dict) -> str:
    """What a drain read: ledger rows (trigger capture) or the slot's transactions (wal)."""
    if "ledger_rows" in d:
        return f"{d['ledger_rows']:,} ledger rows"
    return f"{d['statements']:,} transactions of the slot"


def run_pipeline(env: Env, args: argparse.Namespace, scratch: Path) -> dict:
    out: dict = {"rate": PIPELINE_RATE, "clients": PIPELINE_CLIENTS,
                 "latency_seconds": args.latency_seconds, "backlog_events": args.backlog,
                 "skipped": None, "modes": {}, "failures": []}
    if env.postsave_skip_reason or not env.postsave_bin:
        out["skipped"] = env.postsave_skip_reason or "no post-save binary"
        log(f"skipping the pipeline phase: {out['skipped']}")
        return out
    for pm in PIPELINE_MODES:
        mode = pm.name
        m: dict = {}
        lat = pipeline_latency(env, pm, args.latency_seconds, scratch)
        m["latency"] = lat
        if lat["ok"]:
            log(f"pipeline {mode:<8} latency p50 {lat['p50_ms']:.2f} / p99 {lat['p99_ms']:.2f} "
                f"/ p99.9 {lat['p999_ms']:.2f} ms over {lat['handled']:,} events "
                f"(max {lat['max_ms']:.1f} ms); idle RSS {lat['rss_idle_mb']} MB")
        else:
            log(f"pipeline {mode:<8} latency FAILED: {lat['error']}")
            out["failures"].append({"step": f"{mode} latency", "error": lat["error"]})
        if pm.durable:  # notify keeps nothing while the daemon is down: no backlog to drain
            for case, per_stmt in DRAIN_CASES:
                drain = pipeline_drain(env, pm, args.backlog, scratch, case, per_stmt)
                m[DRAIN_KEYS[case]] = drain
                if drain["ok"]:
                    log(f"pipeline {mode:<8} drain ({case}) {drain['events_per_s']:,.0f} ev/s "
                        f"({drain['events']:,} events in {drain_units(drain)}, "
                        f"{drain['drain_s']:.2f} s; written in {drain['backlog_write_s']} s), "
                        f"{drain['daemon_cpu_s_per_10k']:.3f} CPU s/10k ev "
                        f"({drain['daemon_cores']:.2f} cores), peak RSS "
                        f"{drain['rss_draining_mb']} MB")
                else:
                    log(f"pipeline {mode:<8} drain ({case}) FAILED: {drain['error']}")
                    out["failures"].append({"step": f"{mode} drain ({case})",
                                            "error": drain["error"]})
        out["modes"][mode] = m
    return out


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


# --- each arm beside its floor ------------------------------------------------------------------


def floor_comparison(records: list[dict], arms: list[Arm], workloads: list[Workload]) -> list[dict]:
    """For every arm with a floor that ran too: per round, the arm's rate divided by its floor's
    rate in the same round and workload (1.00 = costs the writers no more than the floor)."""
    ran = {a.name for a in arms}
    out = []
    for wl in workloads:
        for arm in arms:
            if not arm.floor or arm.floor not in ran:
                continue
            floor = {r["round"]: r["rate"] for r in records
                     if r["workload"] == wl.key and r["arm"] == arm.floor and r.get("ok")}
            ratios = [r["rate"] / floor[r["round"]] for r in records
                      if r["workload"] == wl.key and r["arm"] == arm.name and r.get("ok")
                      and floor.get(r["round"])]
            out.append({
                "workload": wl.key, "arm": arm.name, "floor": arm.floor,
                "ratios": [round(x, 4) for x in ratios],
                "ratio_mean": statistics.fmean(ratios) if ratios else None,
                "ratio_min": min(ratios) if ratios else None,
                "ratio_max": max(ratios) if ratios else None,
            })
    return out


def render_floors(result: dict, arms: list[Arm], workloads: list[Workload]) -> list[str]:
    rows = {(f["workload"], f["arm"]): f for f in result.get("floors", [])}
    if not rows:
        return []
    lines = [
        "",
        "## Beside the floor (mean over rounds; min–max in brackets)",
        "",
        "Each round's figure is divided by the figure of the arm's floor in the same round and "
        f"workload: `{TRIGGER_FLOOR}` (an empty trigger while a slot is read) for a trigger "
        f"capture, `{WAL_FLOOR}` (the bare pgoutput stream, read and thrown away) for a WAL "
        "reader. 1.00 costs the writers no more than the floor; the floor's own ratio to "
        "`plain` is in the table above.",
        "",
        "| arm | floor | " + " | ".join(f"{w.key}: {w.title}" for w in workloads) + " |",
        "|---|---|" + "---|" * len(workloads),
    ]
    for arm in arms:
        if not any((w.key, arm.name) in rows for w in workloads):
            continue
        cells = []
        for w in workloads:
            f = rows.get((w.key, arm.name))
            if f is None or f["ratio_mean"] is None:
                cells.append("—")
                continue
            c = f"{f['ratio_mean']:.2f}"
            if len(f["ratios"]) > 1:
                c += f" ({f['ratio_min']:.2f}–{f['ratio_max']:.2f})"
            cells.append(c)
        lines.append(f"| {arm.name} | `{arm.floor}` | " + " | ".join(cells) + " |")
    return lines


def render_pipeline(result: dict) -> list[str]:
    pl = result.get("pipeline")
    if pl is None:
        return []
    lines = ["", "## Pipeline: post-save's daemon end to end", ""]
    if pl.get("skipped"):
        return lines + [f"Skipped: {pl['skipped']}"]
    lines += [
        f"Latency: the event's `at` → the handler's log line, at {pl['rate']:,} events/s "
        f"offered by pgbench (`-R {pl['rate']} -c {pl['clients']}`, single-row INSERTs, "
        f"{pl['latency_seconds']} s). `at` is the trigger's clock_timestamp() (trigger "
        f"captures) or the commit time (wal), both before the commit's WAL flush, which the "
        f"latency includes. RSS idle: after {IDLE_S:g} s with nothing to handle.",
        "",
        "| mode | latency p50 / p99 / p99.9 ms | events | RSS idle MB |",
        "|---|---|---|---|",
    ]
    for pm in PIPELINE_MODES:
        m = pl["modes"].get(pm.name)
        if m is None:
            continue
        lat = m.get("latency", {})
        if lat.get("ok"):
            lat_cell = f"{lat['p50_ms']:.2f} / {lat['p99_ms']:.2f} / {lat['p999_ms']:.2f}"
            n_cell = f"{lat['handled']:,}"
            if lat.get("lost"):
                n_cell += f" ({lat['lost']:,} lost)"
            idle = f"{lat['rss_idle_mb']:.1f}" if lat.get("rss_idle_mb") is not None else "—"
        else:
            lat_cell, n_cell, idle = "failed", "—", "—"
        lines.append(f"| {pm.label} | {lat_cell} | {n_cell} | {idle} |")
    drains = [(pm, case, per, pl["modes"].get(pm.name, {}).get(DRAIN_KEYS[case]))
              for pm in PIPELINE_MODES if pm.durable for case, per in DRAIN_CASES]
    if any(d is not None for *_, d in drains):
        lines += [
            "",
            f"Drain (durable modes only: notify keeps nothing while the daemon is down): "
            f"{pl['backlog_events']:,} rows written by pgbench (`-c {BACKLOG_CLIENTS} "
            f"-j {BACKLOG_JOBS}`) while the daemon was stopped, timed from the daemon's start "
            f"until no ledger row is pending (trigger) or the slot is confirmed up to the WAL "
            f"position read after the backlog (wal). The ledger holds one row per captured "
            f"statement, so single-row transactions leave one ledger row per event (the hard "
            f"case) and 100-row statements one per 100 "
            f"events; wal has no ledger, the slot streams every transaction with its changes. "
            f"Events = rows saved. CPU: the daemon's own (utime + stime); RSS: its peak (VmHWM).",
            "",
            "| mode | backlog written as | events | read as | written in s | drain s "
            "| drain ev/s | CPU s / 10k ev | RSS draining MB |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for pm, case, per, d in drains:
            if d is None:
                continue
            what = "single-row INSERT transactions" if per == 1 else \
                f"INSERT … SELECT, {per} rows per statement"
            if d.get("ok"):
                lines.append(
                    f"| {pm.label} | {what} | {d['events']:,} | {drain_units(d)} | "
                    f"{d['backlog_write_s']:.1f} | {d['drain_s']:.2f} | "
                    f"{d['events_per_s']:,.0f} | {d['daemon_cpu_s_per_10k']:.3f} "
                    f"({d['daemon_cores']:.2f} cores) | {d['rss_draining_mb']:.1f} |")
            else:
                lines.append(f"| {pm.label} | {what} | {d['events']:,} | failed | | | | | |")
    extra = []
    for pm in PIPELINE_MODES:
        lat = pl["modes"].get(pm.name, {}).get("latency", {})
        if lat.get("ok"):
            extra.append(
                f"* {pm.label}, latency run: max {lat['max_ms']:.1f} ms, {lat['over_10ms']} of "
                f"{lat['handled']:,} events over 10 ms; pgbench achieved {lat['tps']:,.0f} TPS "
                f"(schedule lag avg {lat['schedule_lag_avg_ms'] or 0:.1f} ms, max "
                f"{lat['schedule_lag_max_ms'] or 0:.1f} ms); daemon CPU "
                f"{lat.get('daemon_cpu_s_per_10k', 0):.2f} s / 10k ev at this rate, peak RSS "
                f"{lat['rss_load_peak_mb']} MB; other processes took {lat['cpu_other_s']} CPU s "
                f"of {lat['wall_all_s'] * (result['machine'].get('nproc') or 1):.1f}.")
            if lat["tps"] and lat["tps"] < 0.95 * pl["rate"]:
                extra.append(
                    f"  **pgbench reached only {lat['tps']:,.0f} of the {pl['rate']:,} events/s "
                    f"offered**: its {pl['clients']} clients each wait for their commit's WAL "
                    f"flush (and, on a busy machine, for CPU) and fell behind the schedule, then "
                    f"ran flat out to catch up: the load was not the fixed rate asked for.")
    for pm, case, per, d in drains:
        if d and d.get("ok"):
            read = (f"drained {d['ledger_rows_per_s']:,.0f} ledger rows/s"
                    if "ledger_rows_per_s" in d else
                    f"the daemon's /metrics counted {d['handled']:,} deliveries handled, "
                    f"{d['dead']} dead")
            extra.append(
                f"* {pm.label}, drain ({case}): {d['statements']:,} "
                f"{'single-row transactions' if per == 1 else f'transactions of {per} rows'} "
                f"written at {d['backlog_write_tps']:,.0f} TPS "
                f"({d['backlog_write_rows_per_s']:,.0f} rows/s) with no daemon; {read}; "
                f"the whole machine was busy {d['machine_busy_cpu_s']} CPU s during the "
                f"{d['drain_s']:.2f} s drain (PostgreSQL included), other processes "
                f"{d['cpu_other_s']} CPU s.")
    if extra:
        lines += [""] + extra
    return lines


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
    capture = "capture" in result.get("phases", PHASES)
    title = "Capture cost" + (" and post-save pipeline" if result.get("pipeline") else "")
    run_line = f"`{' '.join(['bench/run', *result['argv']])}`"
    if capture:
        run_line += (f" · {result['rounds']} round(s) × {result['seconds']} s per measurement "
                     f"· arms alternate within each round")
    lines = [
        f"# {title}, {result['started_utc']}",
        "",
        run_line,
        "",
        f"Machine: {mi.get('nproc')} CPUs ({mi.get('cpu_model', '?')}), "
        f"{mi.get('mem_total_gib', '?')} GiB RAM, PostgreSQL {mi.get('postgres_version')}, "
        f"fdatasync {fs_txt}; fsync=on, synchronous_commit=on, full_page_writes=on, "
        f"wal_level=logical, shared_buffers={mi.get('pg_settings', {}).get('shared_buffers', '?')}.",
    ]
    if capture:
        lines += ["", interference(result)]
        lines += render_capture(result, arms, workloads, agg)
    lines += render_pipeline(result)
    if result["skipped"]:
        lines += ["", "## Skipped", ""]
        lines += [f"* `{s['arm']}`: {s['reason']}" for s in result["skipped"]]
    if result["failures"]:
        lines += ["", "## Failures", ""]
        for f in result["failures"]:
            err = f["error"].replace("\n", " ⏎ ")
            if f.get("phase") == "pipeline":
                lines.append(f"* pipeline, {f['step']}: {err}")
            else:
                lines.append(f"* workload {f['workload']}, `{f['arm']}`, round {f['round']}: "
                             f"{err}")
    lines.append("")
    return "\n".join(lines)


def render_capture(result: dict, arms: list[Arm], workloads: list[Workload],
                   agg: dict) -> list[str]:
    lines = [
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
    lines += render_floors(result, arms, workloads)
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
    return lines


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

    do_capture = "capture" in args.phase_names
    do_pipeline = "pipeline" in args.phase_names
    wanted = set(args.arm_names) if do_capture else set()
    if do_pipeline or wanted & {a.name for a in ARMS if a.available is postsave_available}:
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
    for wl in workloads if arms else []:
        for rnd in range(1, args.rounds + 1):
            # rotate by one per round: every arm changes position, and consecutive measurements
            # of the same arm always have the other arms between them
            k = (rnd - 1) % len(arms)
            for arm in arms[k:] + arms[:k]:
                n += 1
                rec = measure_when_quiet(env, arm, wl, rnd, args.seconds, scratch)
                records.append(rec)
                if rec["ok"]:
                    log(f"[{n}/{total}] {wl.key} r{rnd} {arm.name:<17} "
                        f"{rec['rate']:>10,.0f} {wl.unit}")
                else:
                    log(f"[{n}/{total}] {wl.key} r{rnd} {arm.name:<17} FAILED: {rec['error']}")

    # the pipeline phase: after the capture arms, on the same cluster
    pipeline = run_pipeline(env, args, scratch) if do_pipeline else None

    failures = [{k: r.get(k) for k in ("workload", "arm", "round", "error")}
                for r in records if not r.get("ok")]
    if args.require_postsave:
        failures += [{"workload": "-", "arm": s["arm"], "round": "-", "error": s["reason"]}
                     for s in skipped]
    if pipeline is not None:
        failures += [{"phase": "pipeline", **f} for f in pipeline["failures"]]
        if pipeline["skipped"] and args.require_postsave:
            failures.append({"phase": "pipeline", "step": "all", "error": pipeline["skipped"]})
    result = {
        "started_utc": started.strftime("%Y-%m-%d %H:%M:%SZ"),
        "argv": argv,
        "quick": args.quick,
        "phases": args.phase_names,
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
        "floors": floor_comparison(records, arms, workloads),
        # what `post-save triggers sql` printed, per watch, as the trigger arms applied it
        "postsave_ddl": POSTSAVE_DDL,
    }
    if pipeline is not None:
        result["pipeline"] = pipeline
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
