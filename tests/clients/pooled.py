"""psycopg 3 through the proxy's pool address (transaction pooling): server-side prepared
statements (psycopg prepares a query after it ran `prepare_threshold` times), pipeline mode,
and several clients sharing the few server connections.

Usage: pooled.py CONNINFO. Prints one line per check; exits non-zero on the first failure.
"""
import sys
import threading

import psycopg

conninfo = sys.argv[1]

setup = psycopg.connect(conninfo, autocommit=True)
setup.execute("CREATE TABLE IF NOT EXISTS py(k int PRIMARY KEY, v text)")

# Prepared statements: prepare_threshold=0 prepares every query on the server at once.
errors = []


def worker(n):
    try:
        with psycopg.connect(conninfo, autocommit=True, prepare_threshold=0) as c:
            for i in range(30):
                k = n * 1000 + i
                c.execute("INSERT INTO py VALUES (%s, %s)", (k, f"v{k}"), prepare=True)
                got = c.execute("SELECT v FROM py WHERE k = %s", (k,), prepare=True).fetchone()
                assert got == (f"v{k}",), got
    except Exception as e:  # noqa: BLE001 - reported below
        errors.append(f"client {n}: {e!r}")


threads = [threading.Thread(target=worker, args=(n,)) for n in range(6)]
for t in threads:
    t.start()
for t in threads:
    t.join()
assert not errors, errors
count = setup.execute("SELECT count(*) FROM py").fetchone()[0]
assert count == 180, count
print("prepared statements from 6 clients:", count, "rows")

# Pipeline mode: many statements in flight, one sync, an error in the middle handled as
# PostgreSQL would.
with psycopg.connect(conninfo, autocommit=True) as c:
    with c.pipeline():
        cursors = [c.execute("SELECT %s::int * 2", (i,)) for i in range(50)]
    assert [cur.fetchone()[0] for cur in cursors] == [i * 2 for i in range(50)]
    try:
        with c.pipeline():
            c.execute("SELECT 1")
            c.execute("SELECT 1 / 0")
            c.execute("SELECT 2")
    except psycopg.errors.DivisionByZero:
        pass
    else:
        raise AssertionError("the error did not come back")
    assert c.execute("SELECT 42").fetchone() == (42,)
print("pipeline mode: 50 statements, an error, and on")

# A transaction across statements keeps its server connection.
with psycopg.connect(conninfo) as c:
    with c.transaction():
        c.execute("INSERT INTO py VALUES (-1, 'in a transaction')")
        pid = c.execute("SELECT pg_backend_pid()").fetchone()[0]
        assert c.execute("SELECT pg_backend_pid()").fetchone()[0] == pid
print("ok")
