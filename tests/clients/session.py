"""A libpq 17+ client (psycopg 3) checks that a session through the proxy is its real backend.

Usage: session.py CONNINFO. Prints one line per check; exits non-zero on the first failure.
"""
import sys
import threading
import time

import psycopg

conninfo = sys.argv[1]
if psycopg.pq.version() < 170000:
    sys.exit(f"libpq {psycopg.pq.version()} is older than 17: no encrypted cancel API")

a = psycopg.connect(conninfo, autocommit=True)
b = psycopg.connect(conninfo, autocommit=True)
assert a.info.pgconn.ssl_in_use, "the session is not encrypted"

# The pid the client was told is its backend's.
told, real = a.info.backend_pid, a.execute("SELECT pg_backend_pid()").fetchone()[0]
assert told == real, f"told pid {told}, backend pid {real}"
row = b.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (told,)).fetchone()
assert row[0] == 1, f"pid {told} not in pg_stat_activity"
print("real backend pid", told)

# NOTIFY names the sender's pid as the sender knows it.
a.execute("LISTEN pgwarden_test")
b.execute("NOTIFY pgwarden_test, 'hello'")
note = next(a.notifies(timeout=10, stop_after=1))
assert note.pid == b.info.backend_pid, f"notify from {note.pid}, sender is {b.info.backend_pid}"
print("notify sender pid", note.pid)

# Cancel over the encrypted connection (libpq 17+: PQcancelBlocking, inside TLS). The cancel
# call itself must succeed: a connection closed without TLS's close_notify fails it.
outcome = {}


def sleep():
    try:
        a.execute("SELECT pg_sleep(20)")
        outcome["query"] = "not cancelled"
    except psycopg.errors.QueryCanceled:
        outcome["query"] = "cancelled"


worker = threading.Thread(target=sleep)
worker.start()
time.sleep(0.5)
a.cancel_safe(timeout=10)
worker.join(30)
assert outcome.get("query") == "cancelled", outcome
print("cancelled inside TLS")

# A session terminated by its own pid, from another session.
b.execute("SELECT pg_terminate_backend(%s)", (a.info.backend_pid,))
try:
    a.execute("SELECT 1")
    sys.exit("the session survived pg_terminate_backend of its own pid")
except psycopg.OperationalError:
    print("terminated by its pid")
print("ok")
