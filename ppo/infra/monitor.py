"""Metrics of an iteration and where they go: TensorBoard, ``metrics.jsonl`` and one line on the console.

Names follow the usual conventions: ``charts/*`` and ``losses/*`` (cleanrl), ``objective/*`` (TRL), ``env/*``
and ``perf/*``. Only the training loop writes; everything here turns episodes into numbers or numbers into files.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from pathlib import Path

from env.rewards import STATUSES


def episode_metrics(episodes) -> dict[str, float]:
    """Success, return, length and the share of each env status among all turns of a batch of episodes."""
    n = max(len(episodes), 1)
    turns = [s for e in episodes for s in e.statuses]
    counts = Counter(turns)
    metrics = {
        "charts/success_rate": sum(e.success for e in episodes) / n,
        "charts/episodic_return": sum(e.episodic_return for e in episodes) / n,
        "charts/episode_turns": len(turns) / n,
        "charts/truncated_rate": sum(e.truncated and not e.cut for e in episodes) / n,
        "charts/cut_episodes": float(sum(e.cut for e in episodes)),
    }
    for status in STATUSES:
        metrics[f"env/status/{status}"] = counts[status] / max(len(turns), 1)
    return metrics


def per_category(episodes) -> dict[str, dict]:
    """Success rate, episode count and status shares for each task category."""
    groups = defaultdict(list)
    for e in episodes:
        groups[e.category].append(e)
    table = {}
    for category, group in sorted(groups.items()):
        m = episode_metrics(group)
        table[category] = {
            "episodes": len(group),
            "success_rate": m["charts/success_rate"],
            "status": {s: m[f"env/status/{s}"] for s in STATUSES},
        }
    return table


def render_episode(episode, max_chars: int = 4000) -> str:
    """An episode's chat as Markdown-ish text for TensorBoard's text tab."""
    lines = [
        f"**task** {episode.task_id} ({episode.category}) · statuses {episode.statuses} · "
        f"return {episode.episodic_return:+.2f}"
    ]
    for m in episode.messages:
        lines.append(f"**{m['role']}**: {str(m.get('content', ''))[:1000]}")
    return "\n\n".join(lines)[:max_chars]


class MetricsLogger:
    """Writes each iteration's metrics to TensorBoard and as one JSON line to ``metrics.jsonl``."""

    def __init__(self, output_dir: Path, start_iteration: int = 0, enabled: bool = True):
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self.writer = None
        if not enabled:
            return
        _truncate_jsonl(self.path, start_iteration)
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(Path(output_dir) / "tensorboard"), purge_step=start_iteration or None)

    def log(self, iteration: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        clean = {k: _finite(v) for k, v in metrics.items()}
        with self.path.open("a") as f:
            f.write(json.dumps({"iteration": iteration, **clean}) + "\n")
        for key, value in clean.items():
            if value is not None:
                self.writer.add_scalar(key, value, iteration)
        self.writer.flush()

    def text(self, tag: str, text: str, iteration: int) -> None:
        if self.enabled:
            self.writer.add_text(tag, text, iteration)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def summary_line(iteration: int, total: int, m: dict[str, float]) -> str:
    return (
        f"iter {iteration + 1:>4}/{total} | success {m['charts/success_rate']:.2f} | "
        f"return {m['charts/episodic_return']:+6.2f} | bad turns "
        f"{m['env/status/invalid_json'] + m['env/status/structural_fail']:.2f} | "
        f"kl {m['objective/kl_ref']:.3f} (coef {m['objective/kl_coef']:.3f}) | "
        f"clip {m['losses/clipfrac']:.3f} | ev {m['losses/explained_variance']:+.2f} | "
        f"{m['perf/rollout_tokens_per_s']:.0f} tok/s | {m['perf/iteration_seconds']:.1f}s"
        + (f" | greedy eval {m['eval/success_rate']:.2f}" if "eval/success_rate" in m else "")
    )


def _finite(value) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _truncate_jsonl(path: Path, start_iteration: int) -> None:
    """On resume, drop lines logged after the checkpoint: those iterations run again."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["iteration"] < start_iteration:
                keep.append(line)
        except (ValueError, KeyError):
            continue
    path.write_text("".join(line + "\n" for line in keep))
