"""The shop database: one in-memory SQLite copy per client session, guarded by an authorizer.

Each session gets a copy of a template built once from data/seed.sql (the backup API copies it in
about 0.02 ms, against 1 ms to re-run the script, measured on 2 CPU cores). The read tool may only
read; the write tool may only INSERT or UPDATE; both run under a time limit, and the database has
size limits, so no call can escape the session, destroy the seed or run forever.
"""

from __future__ import annotations

import re
import sqlite3
import threading
import time
from collections import OrderedDict
from functools import lru_cache
from pathlib import Path

from mcp.server.mcpserver.exceptions import ToolError

from .fmt import fmt_number

SEED_PATH = Path(__file__).parent / "data" / "seed.sql"
MAX_ROWS = 50
MAX_WRITE_ROWS = 100
MAX_SQL_CHARS = 2000
TIME_LIMIT_S = 1.0
MAX_SESSIONS = 256  # live episodes at once (a pool holds 64 by default); the oldest beyond it are dropped
MAX_PAGES = 2048  # 8 MiB at the default 4 KiB page: enough for any honest write, not for a flood
MAX_VALUE_BYTES = 100_000

_READ_ACTIONS = {
    sqlite3.SQLITE_SELECT,
    sqlite3.SQLITE_READ,
    sqlite3.SQLITE_FUNCTION,
    sqlite3.SQLITE_RECURSIVE,
}
_WRITE_ACTIONS = _READ_ACTIONS | {sqlite3.SQLITE_INSERT, sqlite3.SQLITE_UPDATE}
_ACTIONS = (
    "CREATE_INDEX CREATE_TABLE CREATE_TEMP_INDEX CREATE_TEMP_TABLE CREATE_TEMP_TRIGGER CREATE_TEMP_VIEW "
    "CREATE_TRIGGER CREATE_VIEW DELETE DROP_INDEX DROP_TABLE DROP_TEMP_INDEX DROP_TEMP_TABLE DROP_TEMP_TRIGGER "
    "DROP_TEMP_VIEW DROP_TRIGGER DROP_VIEW INSERT PRAGMA READ SELECT TRANSACTION UPDATE ATTACH DETACH "
    "ALTER_TABLE REINDEX ANALYZE CREATE_VTABLE DROP_VTABLE FUNCTION SAVEPOINT RECURSIVE"
)
# Authorizer action codes by name, for messages ("not allowed: DROP TABLE").
_ACTION_NAMES = {
    getattr(sqlite3, f"SQLITE_{n}"): n.replace("_", " ")
    for n in _ACTIONS.split()
    if hasattr(sqlite3, f"SQLITE_{n}")
}
_DENIED_FUNCTIONS = {"load_extension", "readfile", "writefile", "fts3_tokenizer", "printf", "format"}
# printf('%.*c', 1000000000, 'x') pads character by character inside one VM step, out of the progress handler's
# reach (8 s each on 2 cores); text is built with || instead.
# Table-valued functions (json_each, pragma_table_info) register themselves by an internal write to sqlite_master
# and read-only pragmas; a SELECT may use them (the statement itself cannot write: it starts with SELECT).
_READ_PRAGMAS = {"table_info", "table_xinfo", "index_list", "index_info", "foreign_key_list"}


@lru_cache(maxsize=1)
def _template() -> tuple[sqlite3.Connection, threading.Lock]:
    conn = sqlite3.connect(":memory:", check_same_thread=False)
    conn.executescript(SEED_PATH.read_text(encoding="utf-8"))
    return conn, threading.Lock()


def fresh_copy() -> sqlite3.Connection:
    """A private in-memory copy of the seeded database, with size limits set."""
    template, lock = _template()
    conn = sqlite3.connect(":memory:", check_same_thread=False, isolation_level=None)
    with lock:
        template.backup(conn)
    conn.execute(f"PRAGMA max_page_count = {MAX_PAGES}")
    conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, MAX_VALUE_BYTES)
    conn.setlimit(sqlite3.SQLITE_LIMIT_SQL_LENGTH, MAX_SQL_CHARS * 2)
    conn.setlimit(sqlite3.SQLITE_LIMIT_ATTACHED, 0)
    return conn


class ShopDB:
    """One session's database; a lock serializes calls, which the SDK may run in parallel threads."""

    def __init__(self) -> None:
        self.conn = fresh_copy()
        self.lock = threading.Lock()
        self._denied: list[str] = []

    def tables(self) -> list[str]:
        """Names of the user tables, sorted."""
        rows = self.conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name"
        ).fetchall()
        return [name for (name,) in rows]

    def columns(self, table: str) -> list[tuple[str, str]]:
        """(name, type) of each column of a known table."""
        return [(row[1], row[2]) for row in self.conn.execute(f'PRAGMA table_info("{table}")')]

    def count(self, table: str) -> int:
        """Rows in a known table."""
        return self.conn.execute(f'SELECT COUNT(*) FROM "{table}"').fetchone()[0]

    def _authorize(self, allowed: set[int]):
        def authorizer(action: int, arg1, arg2, db_name, trigger) -> int:
            if action == sqlite3.SQLITE_FUNCTION and str(arg2).lower() in _DENIED_FUNCTIONS:
                self._denied.append(f"the function {arg2}()")
                return sqlite3.SQLITE_DENY
            if action in allowed and (db_name in (None, "main", "temp")):
                return sqlite3.SQLITE_OK
            if allowed is _READ_ACTIONS and (
                (action == sqlite3.SQLITE_UPDATE and arg1 == "sqlite_master")
                or (action == sqlite3.SQLITE_PRAGMA and str(arg1).lower() in _READ_PRAGMAS)
            ):
                return sqlite3.SQLITE_OK
            self._denied.append(_ACTION_NAMES.get(action, str(action)))
            return sqlite3.SQLITE_DENY

        return authorizer

    def run(self, sql: str, *, write: bool) -> tuple[list[str], list[tuple], int]:
        """Execute one statement under the authorizer and time limit: (columns, rows, rowcount)."""
        deadline = time.monotonic() + TIME_LIMIT_S
        self._denied = []
        self.conn.set_authorizer(self._authorize(_WRITE_ACTIONS if write else _READ_ACTIONS))
        # Returning non-zero from the progress handler interrupts the statement.
        self.conn.set_progress_handler(lambda: int(time.monotonic() > deadline), 1000)
        try:
            cursor = self.conn.execute(sql)
            rows = cursor.fetchmany(MAX_ROWS + 1)
            names = [d[0] for d in cursor.description or []]
            return names, rows, cursor.rowcount
        finally:
            self.conn.set_authorizer(None)
            self.conn.set_progress_handler(None, 0)

    def explain(self, exc: sqlite3.Error, sql: str, tool: str) -> ToolError:
        """Turn a SQLite error into a message that tells the model how to fix its statement."""
        text = str(exc)
        if self._denied:
            allowed = "INSERT or UPDATE" if tool == "execute_write" else "read-only SELECT"
            return ToolError(f"{tool} runs {allowed} statements only; not allowed: {self._denied[0]}")
        if text == "interrupted":
            return ToolError(
                f"the statement ran longer than {TIME_LIMIT_S:g} s and was stopped; add WHERE or LIMIT"
            )
        if "database or disk is full" in text:
            return ToolError(f"the session database is full ({MAX_PAGES} pages); the statement was undone")
        if "one statement at a time" in text:
            return ToolError("only one SQL statement per call is allowed")
        match = re.match(r"no such table: (?:main\.)?(\S+)", text)
        if match:
            return ToolError(f"unknown table '{match[1]}'; the tables are {', '.join(self.tables())}")
        match = re.match(r"no such column: (\S+)", text)
        if match:
            return ToolError(self._unknown_column(match[1].split(".")[-1], sql))
        return ToolError(f"SQL error: {text}")

    def _unknown_column(self, column: str, sql: str) -> str:
        words = {w.lower() for w in re.findall(r"[A-Za-z_]+", sql)}
        mentioned = [t for t in self.tables() if t in words] or self.tables()
        parts = [
            f"in table {t} the columns are {', '.join(c for c, _ in self.columns(t))}" for t in mentioned
        ]
        if len(mentioned) == 1:
            return (
                f"unknown column '{column}' in table {mentioned[0]}; the columns are "
                + parts[0].split(" are ")[1]
            )
        return f"unknown column '{column}'; " + "; ".join(parts)


class SessionStore:
    """Databases by episode key, dropping the least recently used beyond MAX_SESSIONS."""

    def __init__(self) -> None:
        self._dbs: OrderedDict[str | None, ShopDB] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str | None) -> ShopDB:
        """The database of one episode key, created pristine on first use."""
        with self._lock:
            if key not in self._dbs:
                self._dbs[key] = ShopDB()
                while len(self._dbs) > MAX_SESSIONS:
                    self._dbs.popitem(last=False)[1].conn.close()
            self._dbs.move_to_end(key)
            return self._dbs[key]

    def close(self) -> None:
        """Close every session database."""
        with self._lock:
            for db in self._dbs.values():
                db.conn.close()
            self._dbs.clear()


def _cell(value: object) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, (int, float)):
        return fmt_number(value)
    return str(value)


def format_rows(names: list[str], rows: list[tuple]) -> str:
    """A header line, one line per row (cells joined by ' | ') and a row count."""
    shown = rows[:MAX_ROWS]
    lines = [" | ".join(names), *(" | ".join(_cell(v) for v in row) for row in shown)]
    if len(rows) > MAX_ROWS:
        lines.append(f"(showing the first {MAX_ROWS} rows; add WHERE or LIMIT to see the rest)")
    else:
        lines.append(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")
    return "\n".join(lines)


def _first_word(sql: str) -> str:
    match = re.match(r"\s*([A-Za-z]+)", sql)
    return match[1].upper() if match else ""


def _check_sql(sql: str) -> None:
    if not sql.strip():
        raise ToolError("sql is empty; write a statement such as 'SELECT name, price FROM products LIMIT 5'")
    if len(sql) > MAX_SQL_CHARS:
        raise ToolError(f"sql is {len(sql)} characters long; the limit is {MAX_SQL_CHARS}")


def list_tables(db: ShopDB) -> str:
    """One line per table with its row count."""
    with db.lock:
        return "\n".join(f"{t} ({db.count(t)} rows)" for t in db.tables())


def describe_table(db: ShopDB, table: str) -> str:
    """The columns and types of a table."""
    with db.lock:
        tables = db.tables()
        if table.strip() not in tables:
            raise ToolError(f"unknown table '{table}'; the tables are {', '.join(tables)}")
        table = table.strip()
        columns = ", ".join(f"{name} {kind}" for name, kind in db.columns(table))
        return f"table {table} ({db.count(table)} rows): {columns}"


def query(db: ShopDB, sql: str) -> str:
    """Run a read-only SELECT and format its rows."""
    _check_sql(sql)
    if _first_word(sql) not in ("SELECT", "WITH", "VALUES"):
        raise ToolError(
            "query_database runs read-only SELECT statements; use execute_write for INSERT or UPDATE"
        )
    with db.lock:
        try:
            names, rows, _ = db.run(sql, write=False)
        except sqlite3.Error as exc:
            raise db.explain(exc, sql, "query_database") from None
        return format_rows(names, rows)


def write(db: ShopDB, sql: str) -> str:
    """Run one INSERT or UPDATE in a transaction that is rolled back if it fails or changes too much."""
    _check_sql(sql)
    verb = _first_word(sql)
    if verb not in ("INSERT", "UPDATE"):
        raise ToolError("execute_write runs INSERT or UPDATE statements only; use query_database to read")
    with db.lock:
        db.conn.execute("BEGIN")
        try:
            _, _, changed = db.run(sql, write=True)
        except sqlite3.Error as exc:
            if db.conn.in_transaction:  # an interrupted statement may have rolled it back already
                db.conn.execute("ROLLBACK")
            raise db.explain(exc, sql, "execute_write") from None
        if changed > MAX_WRITE_ROWS:
            db.conn.execute("ROLLBACK")
            raise ToolError(
                f"the statement would change {changed} rows; the limit is {MAX_WRITE_ROWS}, add a WHERE"
            )
        db.conn.execute("COMMIT")
    done = "inserted" if verb == "INSERT" else "updated"
    return f"{done} {changed} row{'s' if changed != 1 else ''}"
