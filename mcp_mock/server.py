"""The MCP server: one typed function per tool; the docstring is what the model reads.

Descriptions are kept to one short sentence because every tool schema is rendered into every prompt
of a small model. Database writes live in a per-episode copy (see `_db` and `EpisodeIsolation`).
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any

from mcp.server.extension import Extension
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from pydantic import Field, WithJsonSchema

from . import calc, data_tools, db, search, units

NUMBER_LIST = WithJsonSchema({"type": "array", "items": {"type": "number"}})
RECORDS = WithJsonSchema({"type": "array", "items": {"type": "object"}})
Records = Annotated[list[Any], RECORDS, Field(description="A list of JSON objects.")]


# Episode isolation (see env/client.py, which defines the same two names for the client side): a client puts a
# key in the `_meta` of every tools/call, a new one per episode, and each key gets its own database. The
# extension tells clients that this server honours it.
EPISODE_EXTENSION = "io.github.qwen-tool/episodes"
EPISODE_META_KEY = "qwen-tool/episode"


class EpisodeIsolation(Extension):
    """Advertises that every episode key in a request's ``_meta`` gets its own, pristine state."""

    identifier = EPISODE_EXTENSION

    def settings(self) -> dict[str, Any]:
        return {"metaKey": EPISODE_META_KEY}


@asynccontextmanager
async def _lifespan(_: MCPServer) -> AsyncIterator[db.SessionStore]:
    # The SDK enters the lifespan once per in-process client, once per stdio process and once per HTTP server.
    store = db.SessionStore()
    try:
        yield store
    finally:
        store.close()


def _db(ctx: Context) -> db.ShopDB:
    """This episode's database: keyed by the episode key in the request's ``_meta``; else by the HTTP session of a
    client that opened one (the 2025 session handshake); else the database every other request of this
    in-process client, stdio process or HTTP server shares."""
    meta = ctx.request_context.meta or {}
    key = meta.get(EPISODE_META_KEY) if isinstance(meta, dict) else None
    if isinstance(key, str):
        return ctx.request_context.lifespan_context.get(f"episode:{key}")
    session = (ctx.headers or {}).get("mcp-session-id")
    return ctx.request_context.lifespan_context.get(f"session:{session}" if session else None)


def _safe_tool(mcp: MCPServer) -> Callable[[Callable[..., Any]], Any]:
    """``mcp.tool`` for functions whose every failure reaches the model as a ToolError it can act on.

    The tools raise ToolError for what they foresee; anything else (an overflow deep in a library) would come
    back as a bare "Error executing tool X" and print a traceback on the trainer's console (in process, the
    server logs there). It becomes one sentence naming the tool and the error instead.
    """
    register = mcp.tool(structured_output=False)

    def decorate(fn: Callable[..., Any]) -> Any:
        @functools.wraps(fn)  # keeps the signature and docstring the tool schema is built from
        def safe(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except ToolError:
                raise
            except Exception as exc:
                detail = str(exc)[:200] or type(exc).__name__
                raise ToolError(
                    f"{fn.__name__} could not handle these arguments ({detail}); try other values"
                ) from None

        return register(safe)

    return decorate


def create_server(log_level: str = "WARNING") -> MCPServer:
    """A fresh server with its own state, for in-process clients (`mcp.Client(create_server())`).

    Failed tool calls are what a policy in training makes all the time, so the SDK's per-failure INFO lines
    are off by default (they would flood the trainer's console).
    """
    mcp = MCPServer(
        "mcp-mock",
        instructions="Math, web search, shop database and data tools.",
        lifespan=_lifespan,
        log_level=log_level,
        extensions=[EpisodeIsolation()],
    )
    tool = _safe_tool(mcp)

    @tool
    def calculator(expression: Annotated[str, Field(description="Arithmetic, e.g. '17 * 23 + 5'.")]) -> str:
        """Evaluate an arithmetic expression (+ - * / ** and sqrt, log, sin, round, ...)."""
        return calc.calculate(expression)

    @tool
    def convert_units(
        value: Annotated[Any, WithJsonSchema({"type": "number"}), Field(description="The amount.")],
        from_unit: Annotated[str, Field(description="Unit symbol, e.g. 'km'.")],
        to_unit: Annotated[str, Field(description="Unit symbol, e.g. 'mi'.")],
    ) -> str:
        """Convert an amount between units of length, mass, time, volume or temperature."""
        return units.convert(value, from_unit, to_unit)

    @tool
    def web_search(
        query: Annotated[str, Field(description="Words to search for.")],
        k: Annotated[int, Field(description="Number of results.")] = 3,
    ) -> str:
        """Search the web and return ranked results with document ids."""
        return search.web_search(query, k)

    @tool
    def open_document(doc_id: Annotated[str, Field(description="Document id, e.g. 'doc-012'.")]) -> str:
        """Return the full text of a document."""
        return search.open_document(doc_id)

    @tool
    def list_tables(ctx: Context) -> str:
        """List the database tables."""
        return db.list_tables(_db(ctx))

    @tool
    def describe_table(table: Annotated[str, Field(description="Table name.")], ctx: Context) -> str:
        """List a table's columns and their types."""
        return db.describe_table(_db(ctx), table)

    @tool
    def query_database(sql: Annotated[str, Field(description="One SELECT statement.")], ctx: Context) -> str:
        """Run a read-only SQL SELECT on the shop database."""
        return db.query(_db(ctx), sql)

    @tool
    def execute_write(
        sql: Annotated[str, Field(description="One INSERT or UPDATE statement.")], ctx: Context
    ) -> str:
        """Run an SQL INSERT or UPDATE on the shop database."""
        return db.write(_db(ctx), sql)

    _add_data_tools(mcp)
    return mcp


def _add_data_tools(mcp: MCPServer) -> None:
    tool = _safe_tool(mcp)

    @tool
    def compute_statistics(
        numbers: Annotated[list[Any], NUMBER_LIST, Field(description="The numbers.")],
    ) -> str:
        """Compute count, sum, mean, median, min, max and stdev of numbers."""
        return data_tools.compute_statistics(numbers)

    @tool
    def sort_records(
        records: Records,
        key: Annotated[str, Field(description="Field to sort by.")],
        descending: Annotated[bool, Field(description="Largest first.")] = False,
    ) -> str:
        """Sort records by a field."""
        return data_tools.sort_records(records, key, descending)

    @tool
    def filter_records(
        records: Records,
        field: Annotated[str, Field(description="Field to test.")],
        op: Annotated[str, Field(description="One of == != < <= > >= contains.")],
        value: Annotated[
            Any, WithJsonSchema({"type": ["string", "number"]}), Field(description="Value to compare.")
        ],
    ) -> str:
        """Keep the records whose field matches a condition."""
        return data_tools.filter_records(records, field, op, value)

    @tool
    def group_records(
        records: Records,
        by: Annotated[str, Field(description="Field to group by.")],
        field: Annotated[str, Field(description="Field to aggregate.")] = "",
        agg: Annotated[str, Field(description="sum, mean, count, min or max.")] = "sum",
    ) -> str:
        """Group records by a field and aggregate another field."""
        return data_tools.group_records(records, by, field, agg)

    @tool
    def parse_csv(text: Annotated[str, Field(description="CSV text with a header row.")]) -> str:
        """Parse CSV text into JSON records."""
        return data_tools.parse_csv(text)
