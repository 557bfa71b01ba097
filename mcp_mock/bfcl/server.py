"""The BFCL MCP server: BFCL's functions as MCP tools, one scenario state per episode.

``create_server()`` serves the multi-turn categories. Tools: the 128 functions of ``GorillaFileSystem``, ``MathAPI``, ``MessageAPI``, ``TwitterAPI``, ``TicketAPI``,
``TradingBot``, ``TravelAPI`` and ``VehicleControlAPI`` (input schemas from BFCL's function docs), plus two that
tasks keep from the model (``env`` task key ``tools``):

- ``bfcl_load_scenario(entry_id)``: the episode's backend instances, fresh, loaded from the entry's
  ``initial_config`` (the task's ``setup`` calls it at reset);
- ``bfcl_verify_turn()``: BFCL's own checker (``multi_turn_checker``: state and execution-response checks
  against the ground truth replayed) on the calls made so far, through the next user turn not yet verified;
  returns ``{"valid": true}`` or ``{"valid": false, "error_type": ..., "error_message": ...}`` (the task's
  success probe calls it when the model ends a user turn).

``create_server("simple_python")`` (or another of ``suite.AST_CATEGORIES``) serves one single-turn category
instead: its entries' functions (``suite.ast_tools``), each call recorded and answered ``recorded``, and
``bfcl_verify_turn`` runs BFCL's AST checker on every call of the episode.

State is kept per episode key (the ``io.github.qwen-tool/episodes`` extension, as in ``mcp_mock``), else per
HTTP session, else shared by the client (in process or over stdio). A function's ``{"error": ...}`` result, or an
exception it raises, is a tool error (``is_error``), with BFCL's own text.
"""

from __future__ import annotations

import copy
import json
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from mcp import types
from mcp.server import Server

from ..server import EPISODE_EXTENSION, EPISODE_META_KEY
from . import _bfcl, suite

MAX_EPISODES = 4096  # episode states kept per client; the oldest is dropped beyond this


@dataclass
class AstState:
    """A single-turn entry: its possible answers and the calls made (under BFCL's names)."""

    entry: dict[str, Any]
    answer: list[dict[str, Any]] | None  # None: irrelevance, no call is right
    served: dict[str, str]  # tool name -> BFCL's function name
    calls: list[dict[str, Any]] = field(default_factory=list)

    def run(self, name: str, arguments: dict[str, Any]) -> tuple[str, bool]:
        if name not in self.served:
            return f"{name} is not one of this entry's functions", True
        self.calls.append({self.served[name]: arguments})
        return "recorded", False

    def verify(self) -> dict[str, Any]:
        """BFCL's AST checker on the calls made (``irrelevance``: valid when none was)."""
        category = suite.category_of(self.entry["id"])
        if self.answer is None:
            if self.calls:
                return {
                    "valid": False,
                    "error_type": "irrelevance:function_called",
                    "error_message": "a call",
                }
            return {"valid": True}
        checker = _bfcl.ast_checker()
        language = _bfcl.language_python()
        result = checker.ast_checker(
            self.entry["function"], self.calls, self.answer, language, category, _bfcl.AST_MODEL_NAME
        )
        if result["valid"]:
            return {"valid": True}
        return {"valid": False, "error_type": result.get("error_type"), "error_message": result.get("error")}


def call_string(name: str, arguments: dict[str, Any]) -> str:
    """A call as BFCL's checker replays it: ``name(key=repr(value), ...)``."""
    return f"{name}({', '.join(f'{k}={v!r}' for k, v in arguments.items())})"


@dataclass
class EpisodeState:
    """A multi-turn entry: one episode's backends and the calls made on them, per user turn (BFCL's
    decoded-response layout)."""

    entry: dict[str, Any]
    truth: list[list[str]]
    instances: dict[str, Any]
    turns: list[list[list[str]]] = field(default_factory=lambda: [[]])
    verified: int = 0

    def owner(self, name: str) -> Any | None:
        """The instance whose public method ``name`` is."""
        for instance in self.instances.values():
            if not name.startswith("_") and callable(getattr(instance, name, None)):
                return instance
        return None

    def run(self, name: str, arguments: dict[str, Any]) -> tuple[str, bool]:
        """Run one backend function; its text (as BFCL renders results) and whether it failed."""
        instance = self.owner(name)
        if instance is None:
            classes = ", ".join(self.instances)
            return f"{name} is not a function of this scenario's backends ({classes})", True
        self.turns[-1].append(
            [call_string(name, arguments)]
        )  # one step per call: the checker replays in order
        try:
            result = getattr(instance, name)(**arguments)
        except Exception as exc:  # BFCL's executor reports a failing call this way
            return f"Error during execution: {exc}", True
        if isinstance(result, str):
            return result, False
        if isinstance(result, dict):
            try:
                text = json.dumps(result)
            except (TypeError, ValueError):
                text = str(result)
            return text, "error" in result
        return str(result), False

    def verify(self) -> dict[str, Any]:
        """BFCL's ``multi_turn_checker`` on the calls through the next unverified user turn (then the next one)."""
        if self.verified >= len(self.truth):
            return {
                "valid": False,
                "error_type": "qwen_tool:no_turn_left",
                "error_message": "every turn is verified",
            }
        upto = self.verified + 1
        model_name = (
            f"qwentool_{uuid.uuid4().hex}"  # the checker caches its instances in globals by this name
        )
        try:
            result = _bfcl.multi_turn_checker().multi_turn_checker(
                self.turns[:upto],
                self.truth[:upto],
                self.entry,
                suite.category_of(self.entry["id"]),
                model_name,
            )
        finally:
            module_globals = vars(_bfcl.multi_turn_utils())
            for key in [k for k in module_globals if k.startswith(model_name)]:
                del module_globals[key]
        self.verified = upto
        self.turns.append([])
        if result["valid"]:
            return {"valid": True}
        return {
            "valid": False,
            "error_type": result.get("error_type"),
            "error_message": result.get("error_message"),
        }


def load_state(entry_id: str) -> EpisodeState | AstState:
    """A fresh scenario for a BFCL entry: backend instances as BFCL's own executor builds them (multi-turn), or
    the entry's functions and possible answers (AST). Both answer ``run(name, arguments)`` and ``verify()``."""
    entry, truth, index = suite.entry_by_id(entry_id)
    category = suite.category_of(entry_id)
    if category in suite.AST_CATEGORIES:
        _, names = suite.ast_tools(category)
        served = {names[(index, k)]: f["name"] for k, f in enumerate(entry["function"])}
        return AstState(entry, truth, served)
    config = _bfcl.backend_config()
    long_context = "long_context" in entry["id"]
    instances = {}
    for cls in entry["involved_classes"]:
        instance = _bfcl.backend_class(cls)()
        if cls not in config.STATELESS_CLASSES:
            instance._load_scenario(
                copy.deepcopy(entry["initial_config"].get(cls, {})), long_context=long_context
            )
        instances[cls] = instance
    return EpisodeState(entry, truth, instances)


def tool_list(category: str | None = None) -> list[types.Tool]:
    """The functions served (every multi-turn backend's, or one AST category's) as MCP tools, then the setup and
    verification tools."""
    if category in suite.AST_CATEGORIES:
        docs = [{**d, "name": name} for name, d in suite.ast_tools(category)[0].items()]
    else:
        docs = [d for class_docs in suite.function_docs().values() for d in class_docs]
    tools = [
        types.Tool(
            name=d["name"], description=d["description"], input_schema=suite.json_schema(d["parameters"])
        )
        for d in docs
    ]
    tools.append(
        types.Tool(
            name=suite.SETUP_TOOL,
            description="Load a BFCL entry's initial state into this episode's backends (task setup).",
            input_schema={
                "type": "object",
                "properties": {"entry_id": {"type": "string", "description": "e.g. 'multi_turn_base_0'"}},
                "required": ["entry_id"],
            },
        )
    )
    tools.append(
        types.Tool(
            name=suite.VERIFY_TOOL,
            description="Check the calls made so far against BFCL's ground truth through the next user turn.",
            input_schema={"type": "object", "properties": {}},
        )
    )
    return tools


class _Store:
    """Episode states by key, oldest dropped beyond ``MAX_EPISODES``."""

    def __init__(self) -> None:
        self.states: OrderedDict[str | None, EpisodeState] = OrderedDict()

    def get(self, key: str | None) -> EpisodeState | None:
        return self.states.get(key)

    def put(self, key: str | None, state: EpisodeState) -> None:
        self.states[key] = state
        self.states.move_to_end(key)
        while len(self.states) > MAX_EPISODES:
            self.states.popitem(last=False)


def _key(ctx: Any) -> str | None:
    """The episode key of the request, else its HTTP session, else None (state shared by the client)."""
    meta = ctx.meta or {}
    key = meta.get(EPISODE_META_KEY) if isinstance(meta, dict) else getattr(meta, EPISODE_META_KEY, None)
    if isinstance(key, str):
        return f"episode:{key}"
    headers = getattr(ctx.request, "headers", None) or {}
    session = headers.get("mcp-session-id")
    return f"session:{session}" if session else None


def _text(text: str, is_error: bool) -> types.CallToolResult:
    return types.CallToolResult(content=[types.TextContent(type="text", text=text)], is_error=is_error)


def create_server(category: str | None = None) -> Server:
    """A BFCL server for in-process clients (``MCPGymEnv(server=create_server())``): the multi-turn categories,
    or one AST category; ``python -m mcp_mock.bfcl [--category C]`` serves it over stdio or HTTP."""
    if category is not None and category not in suite.CATEGORIES:
        raise ValueError(f"unknown BFCL category {category!r}; served: {', '.join(suite.CATEGORIES)}")
    ast = category in suite.AST_CATEGORIES
    tools = tool_list(category)
    names = {t.name for t in tools}

    @asynccontextmanager
    async def lifespan(_: Server) -> AsyncIterator[_Store]:
        yield _Store()  # once per in-process client, stdio process or HTTP server

    async def list_tools(_ctx: Any, _params: Any) -> types.ListToolsResult:
        return types.ListToolsResult(tools=tools)

    async def call_tool(ctx: Any, params: types.CallToolRequestParams) -> types.CallToolResult:
        name, arguments = params.name, dict(params.arguments or {})
        if name not in names:
            return _text(f"Unknown tool: {name}", True)
        store: _Store = ctx.lifespan_context
        key = _key(ctx)
        if name == suite.SETUP_TOOL:
            entry_id = str(arguments.get("entry_id", ""))
            entry_category = suite.category_of(entry_id)
            served_here = entry_category == category if ast else entry_category in suite.MULTI_TURN_CATEGORIES
            if not served_here:
                return _text(
                    f"entry {entry_id!r} is not served here (this server: {category or 'multi-turn'})", True
                )
            try:
                store.put(key, load_state(entry_id))
            except KeyError as exc:
                return _text(str(exc.args[0]), True)
            return _text(f"loaded {entry_id}", False)
        state = store.get(key)
        if state is None:
            return _text(f"no scenario loaded for this episode; call {suite.SETUP_TOOL} first", True)
        if name == suite.VERIFY_TOOL:
            return _text(json.dumps(state.verify()), False)
        return _text(*state.run(name, arguments))

    server = Server("bfcl", lifespan=lifespan, on_list_tools=list_tools, on_call_tool=call_tool)
    server.extensions[EPISODE_EXTENSION] = {"metaKey": EPISODE_META_KEY}
    return server
