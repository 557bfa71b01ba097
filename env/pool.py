"""EnvPool: many MCPGymEnvs stepped together on one event-loop thread, so their tool calls overlap."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Future, wait
from typing import Any

import anyio

from env.client import LoopThread
from env.mcp_env import MCPGymEnv
from env.tasks import TaskSource, load_tasks

StepResult = tuple[str, float, bool, bool, dict[str, Any]]


class EnvPool:
    """``num_envs`` environments sharing one anyio blocking portal.

    The rollout steps a batch of episodes per turn; run one after another, N envs would wait N tool
    latencies. Here ``step`` runs every env's turn as a task on the shared loop, so the calls of
    different envs are in flight together and a batch costs about its slowest env. Calls within one
    env's turn still run in the order the model wrote them.
    """

    def __init__(
        self,
        num_envs: int,
        server: Any = None,
        tasks: TaskSource = None,
        *,
        share_stdio_server: bool = True,
        **env_kwargs: Any,
    ) -> None:
        """``share_stdio_server``: a stdio server that isolates episodes by key (``MCPGymEnv.isolation``) is
        started once and serves every env, instead of one process per env (about 70 MB and a second of start
        each). Other servers, or False, give every env its own session."""
        if num_envs < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        self.tasks = load_tasks(tasks)
        self._loop: LoopThread | None = LoopThread()
        self._portal = self._loop.portal
        self.envs: list[MCPGymEnv] = []
        try:
            first = MCPGymEnv(server, self.tasks, portal=self._portal, lazy_connect=True, **env_kwargs)
            self.envs.append(first)
            self._gather([first.aconnect])
            share = (
                share_stdio_server
                and first.server.kind == "stdio"
                and first.isolation == "episode-key"
                and not env_kwargs.get("fresh_session_per_episode")
            )
            connection = first.connection if share else None
            for _ in range(num_envs - 1):
                env = MCPGymEnv(
                    server,
                    self.tasks,
                    portal=self._portal,
                    lazy_connect=True,
                    connection=connection,
                    **env_kwargs,
                )
                self.envs.append(env)
            self._gather([env.aconnect for env in self.envs[1:]])
        except BaseException:
            self.close()
            raise

    def add_tasks(self, tasks: TaskSource) -> None:
        """Make ``tasks`` playable by id on every env of the pool (see ``MCPGymEnv.add_tasks``)."""
        added = load_tasks(tasks)
        for env in self.envs:
            env.add_tasks(added)
        self.tasks = [*self.tasks, *added]

    def __len__(self) -> int:
        return len(self.envs)

    def reset(
        self, task_ids: list[str] | None = None, seed: int | None = None
    ) -> list[tuple[str, dict[str, Any]]]:
        """Reset the envs: env i on ``task_ids[i]`` when given, env i seeded with ``seed + i``.

        With fewer task ids than envs only the first ``len(task_ids)`` envs are reset (the last, smaller
        batch of an evaluation); the others stay idle.
        """
        if task_ids is not None and len(task_ids) > len(self.envs):
            raise ValueError(f"reset() got {len(task_ids)} task ids for {len(self.envs)} envs")
        envs = self.envs if task_ids is None else self.envs[: len(task_ids)]
        picked = []
        for i, env in enumerate(envs):
            options = None if task_ids is None else {"task_id": task_ids[i]}
            picked.append(env.pick_task(None if seed is None else seed + i, options))
        return self._gather(
            [functools.partial(env.astart, task) for env, task in zip(envs, picked, strict=True)]
        )

    def step(self, texts: Sequence[str | None]) -> list[StepResult | None]:
        """Step env i with ``texts[i]`` concurrently; a None text (or none at all) leaves env i idle."""
        if len(texts) > len(self.envs):
            raise ValueError(f"step() got {len(texts)} texts for {len(self.envs)} envs")
        active = [(env, text) for env, text in zip(self.envs, texts, strict=False) if text is not None]
        for env, text in active:
            env.check_action(text)
        results = iter(self._gather([functools.partial(env.astep, text) for env, text in active]))
        return [None if text is None else next(results) for text in texts]

    def submit(self, i: int, text: str) -> Future[StepResult]:
        """Start env i's step with `text` on the loop and return at once: its result, or its error, is the
        future's. The rollout submits each episode's turn as soon as it is sampled, so tool calls run while the
        other episodes are still generating. Collect with `results`."""
        env = self.envs[i]
        env.check_action(text)
        return self._portal.start_task_soon(env.astep, text)

    @staticmethod
    def results(futures: Sequence[Future[StepResult]]) -> list[StepResult]:
        """The submitted steps' results in order, once every one has finished; the first error is raised."""
        wait(futures)
        return [f.result() for f in futures]  # result() raises the step's own error

    def close(self) -> None:
        """Close every env's session, then the shared loop thread."""
        if self._loop is None:
            return
        try:
            for env in self.envs:
                env.close()
        finally:
            self._loop.close()
            self._loop = None

    def __enter__(self) -> EnvPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _gather(self, jobs: list[Callable[[], Awaitable[Any]]]) -> list[Any]:
        """Run async jobs concurrently on the loop; results in order; the first error is raised."""

        async def run_all() -> list[Any]:
            results: list[Any] = [None] * len(jobs)
            errors: list[BaseException] = []

            async def run(i: int) -> None:
                try:
                    results[i] = await jobs[i]()
                except Exception as exc:  # collected so one env's failure reads as itself, not a group
                    errors.append(exc)

            async with anyio.create_task_group() as tg:
                for i in range(len(jobs)):
                    tg.start_soon(run, i)
            if errors:
                raise errors[0]
            return results

        return self._portal.call(run_all)
