"""MCPGymEnv: a gymnasium environment whose actions are assistant turns that call MCP tools."""

from __future__ import annotations

import copy
import string
import uuid
import warnings
from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym
from anyio.from_thread import BlockingPortal
from gymnasium import spaces

from env.client import EPISODE_META_KEY, Bridge, MCPConnection, resolve_server, truncate_middle
from env.parsing import ParsedCall, parse_turn
from env.rewards import RewardConfig, worst_status
from env.schema import argument_error, make_validator, openai_tool
from env.tasks import TaskError, TaskSource, is_conversation, load_tasks, user_turns
from env.verify import answer_matches, call_matches, has_call_conditions, probe_matches

MAX_TEXT_LENGTH = 1 << 20  # characters; a turn or an observation longer than this is not a real one
_SAMPLE_CHARSET = string.printable + "äéßøΩπ中文字🙂…"
_INVALID = ("invalid_json", "structural_fail")


class AnyText(spaces.Text):
    """A Text space that contains any string up to ``max_length``, whatever its characters.

    ``spaces.Text`` checks every character against its charset (alphanumeric by default), and a model
    writes JSON, markup and any Unicode. Sampling draws from a printable charset with some non-ASCII.
    """

    def __init__(self, max_length: int = MAX_TEXT_LENGTH, *, min_length: int = 0) -> None:
        super().__init__(max_length, min_length=min_length, charset=_SAMPLE_CHARSET)

    def contains(self, x: Any) -> bool:
        """Any ``str`` within the length bounds."""
        return isinstance(x, str) and self.min_length <= len(x) <= self.max_length


@dataclass
class _Episode:
    """State of the episode in progress."""

    task: dict[str, Any]
    max_turns: int
    tools: list[dict[str, Any]]  # what the model is shown: the server's tools, or the task's subset of them
    messages: list[dict[str, Any]] = field(default_factory=list)
    turn: int = 0
    user_turn: int = 0  # index of the user turn in progress (conversations)
    turns_in_user_turn: int = 0
    invalid_streak: int = 0
    call_condition_met: bool = False
    done: bool = False


class MCPGymEnv(gym.Env[str, str]):
    """Teach a language model to call tools on an MCP server.

    ## Description
    Each episode is a task (a prompt plus success conditions). The agent writes assistant turns in the
    Qwen3/Hermes format (``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, several per turn
    allowed, ``<think>`` ignored); the env runs the calls on the server, one after another in the
    order written, and returns their results so the model can go on or correct itself.

    ## Action Space
    ``AnyText``: the raw text of one assistant turn. Any string is accepted; ``step`` never raises on it.

    ## Observation Space
    ``AnyText``: after ``reset`` the task prompt; after ``step`` the tool messages of that turn joined
    by newlines (empty when the episode ended without tool output). ``info["messages"]`` holds the
    whole chat as OpenAI-style dicts and ``info["tools"]`` the server's tools as function schemas.

    ## Info
    Every ``reset`` and ``step`` returns a fresh dict (the rollout and the warm start read these keys; they are the
    contract): ``messages`` (the whole chat so far, OpenAI-style dicts: the user prompt, each assistant turn, each
    tool message), ``tools`` (the tools the task may see as OpenAI function schemas, what the chat template
    renders: the server's, or the subset the task's ``tools`` names), ``task`` (a copy of the task), ``task_id``,
    ``turn`` (turns played), ``user_turn`` (index of the user turn in progress). ``step`` adds ``status`` (the turn's
    status, below), ``tool_messages`` (this turn's tool messages, ``{"role": "tool", "name", "content"}``),
    ``new_messages`` (every message the env appended after the assistant turn: the tool messages, then the next
    user message when a conversation goes on) and ``calls`` (each parsed call: ``name``, ``arguments``, ``error``,
    the reason when it was not valid JSON).

    ## Rewards
    One reward per turn from :class:`env.RewardConfig` by ``info["status"]``: ``success`` (the task
    is complete after the turn), ``tool_execution``, ``tool_error`` (schema violation, error result,
    timeout, lost server), ``invalid_json``, ``structural_fail`` (unknown tool, calls beyond
    ``max_calls_per_turn``, or a final answer that does not complete the task). With several calls
    the most severe status wins, unless the task is complete.

    ## Starting State
    A task drawn with ``np_random`` (or ``options={"task_id": ...}``), on server state no other episode has
    touched wherever the server allows it (``isolation``):

    - ``"episode-key"``: the server lists the ``io.github.qwen-tool/episodes`` extension in its capabilities
      (``mcp_mock`` does); every tools/call of an episode carries a new key in ``_meta["qwen-tool/episode"]``
      and the server keeps one state per key. Works on every transport and for envs sharing one server.
    - ``"fresh-session"``: a new session per episode: in-process servers without the extension (each client
      gets its own lifespan state), or ``fresh_session_per_episode=True`` (e.g. a stdio server that keeps its
      state per process: a new process per episode, about 1 s each).
    - ``"none"``: a stdio or HTTP server without the extension; its writes are visible to later episodes, and
      the env warns once.

    ## Conversations
    A task whose ``prompt`` is a list of user turns (``env.tasks``) is verified when the model ends a user turn
    with a final answer: if ``success`` holds and a user turn is left, the turn pays ``tool_execution`` (progress,
    the task not complete yet) and the next user message arrives; on the last one it is ``success``; if not, it
    is a ``structural_fail`` and the episode ends. Calls never complete a user turn by themselves, and
    ``max_turns`` counts the assistant turns of each user turn.

    ## Episode End
    Terminated: on ``success``; on a final answer (a turn with no tool call) that does not go on to a next user
    turn; after
    ``max_invalid_turns`` consecutive ``invalid_json``/``structural_fail`` turns. The last is a
    termination, not a truncation, because it is a rule of this MDP the agent's own turns trigger:
    the env will never continue from that state, so bootstrapping a value from it would credit the
    agent with reward it cannot get. Truncated: the turn limit (the task's ``max_turns``, else the
    env's) is reached without termination.

    ## Arguments
    - ``server``: None (the bundled ``mcp_mock``, in-process), an ``MCPServer`` object (in-process), a
      command line string or list (stdio), or an ``http(s)://.../mcp`` URL (streamable HTTP).
    - ``tasks``: a JSONL path, a list of task dicts, or None (``mcp_mock``'s train split).
    - ``max_turns``: turn limit for tasks without their own ``max_turns``.
    - ``reward``: a :class:`RewardConfig` (the README's reward matrix when None).
    - ``call_timeout``: seconds a tool call may take before it is a ``tool_error``.
    - ``max_output_chars``: a longer tool output is cut in the middle with a marker.
    - ``max_calls_per_turn``: calls run per turn; more calls make the turn a ``structural_fail``.
    - ``max_invalid_turns``: consecutive invalid turns that end the episode.
    - ``fresh_session_per_episode``: True: a new MCP session at every reset; False: never; None (default):
      only where that isolates episodes and the server's episode keys do not (in-process servers).
    - ``portal``: an anyio ``BlockingPortal`` to share one event-loop thread (``EnvPool`` does this).
    - ``start_timeout``: seconds a server has to start before :class:`env.ServerStartError`.
    - ``lazy_connect``: connect on the first reset rather than in the constructor.
    - ``connection``: an open ``MCPConnection`` to share with other envs (only to a server that isolates
      episodes by key: their episodes then run side by side on one session); this env never closes it.

    A server that dies is restarted on the next call; if the restart fails, ``step`` raises
    :class:`env.ServerStartError` (the env cannot go on, and that is not the model's doing).
    """

    metadata = {"render_modes": []}  # noqa: RUF012 (gymnasium's convention is a class attribute)

    def __init__(
        self,
        server: Any = None,
        tasks: TaskSource = None,
        max_turns: int = 4,
        *,
        reward: RewardConfig | None = None,
        call_timeout: float = 10.0,
        max_output_chars: int = 2000,
        max_calls_per_turn: int = 4,
        max_invalid_turns: int = 2,
        fresh_session_per_episode: bool | None = None,
        portal: BlockingPortal | None = None,
        start_timeout: float = 30.0,
        lazy_connect: bool = False,
        connection: MCPConnection | None = None,
    ) -> None:
        if max_turns < 1 or max_calls_per_turn < 1 or max_invalid_turns < 1 or max_output_chars < 1:
            raise ValueError(
                "max_turns, max_calls_per_turn, max_invalid_turns and max_output_chars must be >= 1"
            )
        self.tasks = load_tasks(tasks)
        self._tasks_by_id = {task["id"]: task for task in self.tasks}
        self.server = resolve_server(server)
        self.max_turns = max_turns
        self.reward_config = reward or RewardConfig()
        self.call_timeout = call_timeout
        self.max_output_chars = max_output_chars
        self.max_calls_per_turn = max_calls_per_turn
        self.max_invalid_turns = max_invalid_turns
        self.fresh_session_per_episode = fresh_session_per_episode
        self._episode_key: str | None = None
        self._warned_shared_state = False
        self.observation_space = AnyText()
        self.action_space = AnyText()
        self._tools: list[dict[str, Any]] | None = None
        self._validators: dict[str, Any] = {}
        self._episode: _Episode | None = None
        self._bridge = Bridge(portal)
        # A connection handed in is shared with other envs (EnvPool does this for a stdio server that isolates
        # episodes by key): this env uses it and leaves closing it to its owner.
        self._owns_connection = connection is None
        self._connection = connection or MCPConnection(
            self.server, self._bridge.task_group, start_timeout=start_timeout
        )
        if not lazy_connect:
            try:
                self._bridge.call(self.aconnect)
            except BaseException:
                self.close()
                raise

    def add_tasks(self, tasks: TaskSource) -> list[dict[str, Any]]:
        """Validate ``tasks`` and make them playable by id (``reset(options={"task_id": ...})``); returns them.

        An id this env already has is refused (``TaskError``), as in a task file."""
        added = load_tasks(tasks)
        taken = [t["id"] for t in added if t["id"] in self._tasks_by_id]
        if taken:
            raise TaskError(f"task id {taken[0]!r} is already one of this env's tasks")
        self.tasks = [*self.tasks, *added]
        self._tasks_by_id.update((t["id"], t) for t in added)
        return added

    @property
    def tools(self) -> list[dict[str, Any]]:
        """The server's tools as OpenAI function schemas (a copy)."""
        if self._tools is None:
            self._bridge.call(self.aconnect)
        return copy.deepcopy(self._tools)

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[str, dict[str, Any]]:
        """Start an episode on a task; returns the prompt and the info described in the class docstring."""
        task = self.pick_task(seed, options)
        return self._bridge.call(self.astart, task)

    def step(self, action: str) -> tuple[str, float, bool, bool, dict[str, Any]]:
        """Run one assistant turn; see the class docstring for statuses, rewards and episode end."""
        self.check_action(action)
        return self._bridge.call(self.astep, action)

    def close(self) -> None:
        """Close the MCP session (and a stdio server process) and the event-loop thread."""
        if self._bridge.closed:
            return
        try:
            if self._owns_connection:
                self._bridge.call(self._connection.close)
        finally:
            self._bridge.close()

    # The public pieces below split reset and step into a synchronous part and a coroutine, so that EnvPool can
    # run many envs' sessions and calls at once on one event loop. ``reset`` is ``pick_task`` + ``astart``;
    # ``step`` is ``check_action`` + ``astep``.

    def pick_task(self, seed: int | None, options: dict[str, Any] | None) -> dict[str, Any]:
        """Seed the RNG (gymnasium's contract) and choose the task: ``options["task_id"]``, else a random one."""
        super().reset(seed=seed)
        task_id = (options or {}).get("task_id")
        if task_id is None:
            return self.tasks[int(self.np_random.integers(len(self.tasks)))]
        if task_id not in self._tasks_by_id:
            examples = ", ".join(repr(t["id"]) for t in self.tasks[:3])
            raise ValueError(
                f"unknown task id {task_id!r}; this env has {len(self.tasks)} tasks, e.g. {examples}"
            )
        return self._tasks_by_id[task_id]

    async def astart(self, task: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """Start an episode of ``task`` (from ``pick_task``) on untouched server state; ``reset``'s return value."""
        await self._astart_session()
        await self._arun_setup(task)
        return self._begin(task)

    @property
    def connection(self) -> MCPConnection:
        """The MCP connection this env calls through (``EnvPool`` shares one among envs; see ``connection=``)."""
        return self._connection

    def _begin(self, task: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """Open the episode's chat with the task's (first) user message."""
        self._episode = _Episode(task, int(task.get("max_turns", self.max_turns)), self._task_tools(task))
        prompt = user_turns(task)[0]
        self._episode.messages.append({"role": "user", "content": prompt})
        return prompt, self._info()

    def _task_tools(self, task: dict[str, Any]) -> list[dict[str, Any]]:
        """The tools the task may see: the server's, or those its ``tools`` names (in the server's order)."""
        assert self._tools is not None
        if "tools" not in task:
            return self._tools
        wanted = set(task["tools"])
        missing = sorted(wanted - set(self._validators))
        if missing:
            raise TaskError(f"task {task['id']!r} lists tools the server does not have: {', '.join(missing)}")
        return [t for t in self._tools if t["function"]["name"] in wanted]

    async def _arun_setup(self, task: dict[str, Any]) -> None:
        """The task's ``setup`` calls, on this episode's state; a failing one means the task cannot be played."""
        for call in task.get("setup", []):
            result = await self._connection.call(
                call["name"], call.get("arguments", {}), self.call_timeout, self._call_meta()
            )
            if result.is_error:
                raise TaskError(
                    f"task {task['id']!r}: setup call {call['name']!r} failed: {result.text[:200]}"
                )

    def check_action(self, action: Any) -> None:
        """Refuse misuse (not model text) with a clear error: no episode, an ended one, or a non-str action."""
        if self._episode is None:
            raise RuntimeError("step() called before reset(); call reset() to start an episode")
        if self._episode.done:
            raise RuntimeError("step() called after the episode ended; call reset() to start a new one")
        if not isinstance(action, str):
            raise TypeError(f"step() takes the assistant turn as a str, got {type(action).__name__}")

    async def aconnect(self) -> None:
        """Open a session if none is open, and list the tools once per env."""
        if not self._connection.connected:
            await self._connection.open()
        if self._tools is None:
            tools = await self._connection.list_tools()
            self._tools = [openai_tool(t) for t in tools]
            self._validators = {
                t["function"]["name"]: make_validator(t["function"]["parameters"]) for t in self._tools
            }

    @property
    def isolation(self) -> str:
        """How episodes are kept apart on the server: "episode-key", "fresh-session" or "none" (see Starting State).

        Known once the env has connected (the server's capabilities say whether it honours episode keys)."""
        if self._connection.isolates_episodes:
            return "episode-key"
        if self.fresh_session_per_episode or (
            self.fresh_session_per_episode is None and self.server.kind == "inprocess"
        ):
            return "fresh-session"
        return "none"

    async def _astart_session(self) -> None:
        """Give the episode untouched server state: a new episode key, or a new session (see ``isolation``)."""
        if self.fresh_session_per_episode or self.isolation == "fresh-session":
            await self._connection.close()
        await self.aconnect()
        isolation = self.isolation
        self._episode_key = uuid.uuid4().hex if isolation == "episode-key" else None
        if isolation == "none" and not self._warned_shared_state:
            self._warned_shared_state = True
            warnings.warn(
                f"MCP server {self.server.label!r} does not declare episode isolation (the "
                "io.github.qwen-tool/episodes extension): what one episode writes, later ones see. See the "
                "README, 'What is guaranteed'; fresh_session_per_episode=True gives a stdio server a new process "
                "per episode.",
                RuntimeWarning,
                stacklevel=1,
            )

    def _call_meta(self) -> dict[str, str] | None:
        """The ``_meta`` of this episode's tool calls."""
        return {EPISODE_META_KEY: self._episode_key} if self._episode_key else None

    async def astep(self, text: str) -> tuple[str, float, bool, bool, dict[str, Any]]:
        """Parse the turn, run its calls, verify the task, and build the 5-tuple."""
        episode = self._episode
        assert episode is not None
        episode.turn += 1
        episode.messages.append({"role": "assistant", "content": text})
        episode.turns_in_user_turn += 1
        parsed = parse_turn(text)
        tool_messages: list[dict[str, Any]] = []
        next_user: list[dict[str, Any]] = []
        conversation = is_conversation(episode.task)
        if parsed.calls:
            statuses = await self._arun_calls(parsed.calls, tool_messages)
            complete = not conversation and await self._acomplete(None)
            status = "success" if complete else worst_status(statuses)
            terminated = status == "success"
        elif not await self._acomplete(parsed.content):
            status, terminated = "structural_fail", True
        elif conversation and episode.user_turn + 1 < len(episode.task["prompt"]):
            status, terminated = "tool_execution", False  # this user turn is done; the next one arrives
            episode.user_turn += 1
            episode.turns_in_user_turn = 0
            episode.call_condition_met = False
            next_user.append({"role": "user", "content": episode.task["prompt"][episode.user_turn]})
        else:
            status, terminated = "success", True
        episode.invalid_streak = episode.invalid_streak + 1 if status in _INVALID else 0
        terminated = terminated or episode.invalid_streak >= self.max_invalid_turns
        truncated = not terminated and episode.turns_in_user_turn >= episode.max_turns
        episode.done = terminated or truncated
        episode.messages.extend(tool_messages + next_user)
        info = self._info(
            status=status,
            tool_messages=tool_messages,
            new_messages=[dict(m) for m in tool_messages + next_user],
            calls=[c.as_dict() for c in parsed.calls],
        )
        obs = "\n".join(m["content"] for m in tool_messages + next_user)
        return obs, self.reward_config.reward(status), terminated, truncated, info

    async def _arun_calls(self, calls: list[ParsedCall], tool_messages: list[dict[str, Any]]) -> list[str]:
        """Run up to ``max_calls_per_turn`` calls in order; append their tool messages; return statuses."""
        statuses = []
        for call in calls[: self.max_calls_per_turn]:
            status, content = await self._arun_call(call)
            statuses.append(status)
            content = truncate_middle(content, self.max_output_chars)
            tool_messages.append({"role": "tool", "name": call.name, "content": content})
        skipped = len(calls) - self.max_calls_per_turn
        if skipped > 0:
            statuses.append("structural_fail")
            note = f"{skipped} tool call(s) not run: at most {self.max_calls_per_turn} calls are run per turn"
            tool_messages.append({"role": "tool", "name": None, "content": note})
        return statuses

    async def _arun_call(self, call: ParsedCall) -> tuple[str, str]:
        """One call's status and the text the model reads about it."""
        if call.error is not None:
            return "invalid_json", call.error
        episode = self._episode
        assert call.name is not None and episode is not None
        shown = [t["function"]["name"] for t in episode.tools]
        if call.name not in shown:
            return "structural_fail", f"unknown tool {call.name[:80]!r}; available tools: {', '.join(shown)}"
        problem = argument_error(self._validators[call.name], call.arguments)
        if problem is not None:
            return "tool_error", f"invalid arguments for tool {call.name!r}: {problem}"
        result = await self._connection.call(call.name, call.arguments, self.call_timeout, self._call_meta())
        if result.is_error:
            return "tool_error", result.text
        if call_matches(episode.task["success"], call.name, result.text):
            episode.call_condition_met = True
        return "tool_execution", result.text

    async def _acomplete(self, answer: str | None) -> bool:
        """Whether the task is complete after this turn (``answer`` is the final answer, if it was one)."""
        episode = self._episode
        assert episode is not None
        success = episode.task["success"]
        if has_call_conditions(success) and not episode.call_condition_met:
            return False
        if "answer_contains" in success and (answer is None or not answer_matches(success, answer)):
            return False
        if "probe" in success:
            probe = success["probe"]
            arguments = probe.get("arguments", {})
            result = await self._connection.call(
                probe["name"], arguments, self.call_timeout, self._call_meta()
            )
            return not result.is_error and probe_matches(probe, result.text)
        return True

    def _info(self, **extra: Any) -> dict[str, Any]:
        """A fresh info dict (gymnasium's checker forbids sharing objects between returns)."""
        episode = self._episode
        assert episode is not None
        info = {
            "messages": [dict(m) for m in episode.messages],
            "tools": copy.deepcopy(episode.tools),
            "task": copy.deepcopy(episode.task),
            "task_id": episode.task["id"],
            "turn": episode.turn,
            "user_turn": episode.user_turn,
        }
        info.update(extra)
        return info
