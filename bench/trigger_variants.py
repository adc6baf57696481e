#!/usr/bin/env python3
"""Backend CPU and WAL per captured row for the capture arms of capture.py (no pgbench).

For each arm (by default plain, event_log, pgq and post-save's captures) on a fresh database
with the harness's shop_order table, the arm's capture is installed as `bench/run` installs it
(post-save's with the clone's binary: `migrate`, then the DDL of `triggers sql`; no daemon
runs, and no arm's consumer either). Then one backend runs a DO loop of single-row INSERTs (one
statement each, one transaction), then a DO loop of single-column UPDATEs on a 100,000-row table,
then 100-row INSERT … SELECT statements, and its own CPU time (utime + stime of
/proc/<backend pid>/stat) is read before and after. CPU time of one process moves far less with
other load on the machine than throughput does, so this gives the trigger's own work even when
the machine is busy; it leaves out what is per transaction (commit, WAL flush), which pgbench
measures. Each figure is the minimum over --repeat runs.

Needs root and PostgreSQL 15 with PgQ (bench/run installs them); starts its own private cluster
with the settings of bench/run in a temp dir and removes it afterwards. Builds post-save
(release) into the clone's cargo target directory unless --no-build.

    python3 bench/trigger_variants.py [--rows 20000] [--repeat 3] [--arms event_log,postsave_capture]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import capture  # noqa: E402

PGBIN = Path("/usr/lib/postgresql/15/bin")
CLK_TCK = os.sysconf("SC_CLK_TCK")


def start_cluster() -> tuple[capture.Cluster, Path]:
    work = Path(tempfile.mkdtemp(prefix="post-save-variants."))
    shutil.chown(work, "postgres", "postgres")
    os.chmod(work, 0o755)
    pgdata = work / "data"
    subprocess.run(["runuser", "-u", "postgres", "--", str(PGBIN / "initdb"), "-D", str(pgdata),
                    "-U", "postgres", "--auth=trust", "--no-locale", "-E", "UTF8"],
                   check=True, capture_output=True)
    port = 20000 + os.getpid() % 20000
    with open(pgdata / "postgresql.conf", "a") as f:
        f.write(f"""
port = {port}
listen_addresses = ''
unix_socket_directories = '{work}'
fsync = on
synchronous_commit = on
full_page_writes = on
wal_level = logical
shared_buffers = 256MB
max_wal_size = 8GB
checkpoint_timeout = 30min
max_replication_slots = 4
max_wal_senders = 4
""")
    subprocess.run(["runuser", "-u", "postgres", "--", str(PGBIN / "pg_ctl"), "-D", str(pgdata),
                    "-l", str(work / "postgres.log"), "-w", "start"], check=True,
                   capture_output=True)
    return capture.Cluster(host=str(work), port=port, pgdata=pgdata, pgbin=PGBIN, work=work), work


def stop_cluster(cluster: capture.Cluster, work: Path) -> None:
    subprocess.run(["runuser", "-u", "postgres", "--", str(PGBIN / "pg_ctl"), "-D",
                    str(cluster.pgdata), "-m", "immediate", "-w", "stop"], capture_output=True)
    shutil.rmtree(work, ignore_errors=True)


# One psql session: report its backend's CPU ticks, run the loop, report them again.
PROBE = "select pg_backend_pid();"


def backend_cpu_of(sql_before: str, body: str, cluster: capture.Cluster,
                   db: str) -> tuple[float, float]:
    """(CPU seconds the backend spent on `body`, WAL bytes it wrote), in one session."""
    # psql prints the pid first; we read /proc while the session waits on a pg_sleep we control
    # from here, so the measurement brackets exactly `body`.
    p = subprocess.Popen([cluster.tool("psql"), *cluster.conn_args(db), "-X", "-q", "-A", "-t",
                          "-v", "ON_ERROR_STOP=1"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    assert p.stdin and p.stdout
    p.stdin.write(sql_before + PROBE + "\n")
    p.stdin.flush()
    pid = int(p.stdout.readline().strip())

    def ticks() -> int:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(f[11]) + int(f[12])

    p.stdin.write("select pg_current_wal_insert_lsn();\n")
    p.stdin.flush()
    lsn0 = p.stdout.readline().strip()
    t0 = ticks()
    p.stdin.write(body + "\nselect 'done';\n")
    p.stdin.flush()
    line = p.stdout.readline().strip()
    t1 = ticks()
    p.stdin.write(f"select pg_current_wal_insert_lsn() - '{lsn0}'::pg_lsn;\n")
    p.stdin.flush()
    wal = p.stdout.readline().strip()
    p.stdin.close()
    err = p.stderr.read() if p.stderr else ""
    p.wait()
    if line != "done":
        raise capture.BenchError(f"loop failed on {db}: {line} {err}")
    return (t1 - t0) / CLK_TCK, float(wal)


# plain, two peers, and post-save's trigger captures (the daemon never runs here)
DEFAULT_ARMS = ["plain", "event_log", "pgq", "postsave_capture", "postsave_durable_row",
                "postsave_notify"]


def install(arm: capture.Arm, cluster: capture.Cluster, db: str, scratch: Path,
            postsave_bin: str | None) -> None:
    """The arm's capture, as bench/run installs it (setup only: no background consumer)."""
    if isinstance(arm.setup, str):
        cluster.psql(db, arm.setup)
    elif arm.setup is not None:
        arm.setup(capture.Ctx(cluster, db, scratch, postsave_bin))


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="trigger_variants.py")
    ap.add_argument("--rows", type=int, default=20000, help="single-row INSERTs/UPDATEs per loop")
    ap.add_argument("--batches", type=int, default=200, help="100-row INSERT … SELECT per loop")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--arms", help=f"comma-separated subset of capture.py's arms "
                    f"(default: {','.join(DEFAULT_ARMS)})")
    ap.add_argument("--no-build", action="store_true",
                    help="do not run cargo build; use the post-save binary already built")
    a = ap.parse_args(argv)
    arms = {arm.name: arm for arm in capture.ARMS}
    names = a.arms.split(",") if a.arms else DEFAULT_ARMS
    unknown = [n for n in names if n not in arms]
    if unknown:
        ap.error(f"unknown arm(s): {', '.join(unknown)}")
    cluster, work = start_cluster()
    results: dict[str, dict[str, list[float]]] = {}
    wals: dict[str, dict[str, float]] = {}
    try:
        env = capture.Env(cluster, Path(__file__).resolve().parent.parent)
        if any(arms[n].available is capture.postsave_available for n in names):
            capture.build_postsave(env, a)
            if not env.postsave_bin:
                raise capture.BenchError(f"post-save unavailable: {env.postsave_skip_reason}")
        scratch = work / "scratch"
        scratch.mkdir()
        os.chmod(scratch, 0o755)
        for rep in range(a.repeat):
            for name in names:
                arm = arms[name]
                for kind in ("insert", "update", "batch"):
                    db = "variants"
                    cluster.create_db(db)
                    cluster.psql(db, capture.TABLE_SQL)
                    if kind == "update":
                        cluster.psql(db, "insert into shop_order (user_id, product, quantity) "
                                         "select g % 1000, 'widget-' || (g % 50), 1 "
                                         "from generate_series(1, 100000) g; "
                                         "vacuum analyze shop_order;")
                    install(arm, cluster, db, scratch, env.postsave_bin)
                    if kind == "insert":
                        body = (f"do $$ begin for i in 1..{a.rows} loop insert into shop_order "
                                "(user_id, product, quantity) values (i, 'widget', 1 + i % 10); "
                                "end loop; end $$;")
                        per = a.rows
                    elif kind == "update":
                        body = (f"do $$ begin for i in 1..{a.rows} loop update shop_order "
                                "set quantity = quantity + 1 "
                                "where id = 1 + (i * 7919) % 100000; end loop; end $$;")
                        per = a.rows
                    else:
                        body = (f"do $$ begin for i in 1..{a.batches} loop insert into shop_order "
                                "(user_id, product, quantity) select (random() * 100000)::bigint, "
                                "'widget-' || g, 1 + g % 10 from generate_series(1, 100) g; "
                                "end loop; end $$;")
                        per = a.batches * 100
                    cpu, wal = backend_cpu_of("", body, cluster, db)
                    wals.setdefault(name, {})[kind] = wal / per
                    if arm.captured:
                        got = int(cluster.psql(db, arm.captured))
                        if got != per:
                            raise capture.BenchError(f"{name}/{kind}: captured {got} of {per}")
                    results.setdefault(name, {}).setdefault(kind, []).append(cpu / per * 1e6)
                    cluster.drop_db(db)
                print(f"rep {rep + 1} {name:15s} " + "  ".join(
                    f"{k} {results[name][k][-1]:6.1f}" for k in ("insert", "update", "batch")),
                    file=sys.stderr, flush=True)
    finally:
        stop_cluster(cluster, work)
    kinds = ("insert", "update", "batch")
    print(f"Backend CPU in µs per row, min of {a.repeat} (max in brackets); WAL bytes per row.\n")
    print("| arm | single-row INSERT | single-row UPDATE | row of a 100-row INSERT "
          "| WAL B/row: INSERT | UPDATE | 100-row INSERT |")
    print("|---|---|---|---|---|---|---|")
    for name in names:
        r = results[name]
        print(f"| {name} | " + " | ".join(
            f"{min(r[k]):.1f} ({max(r[k]):.1f})" for k in kinds) + " | "
            + " | ".join(f"{wals[name][k]:.0f}" for k in kinds) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
