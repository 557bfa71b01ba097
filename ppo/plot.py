"""Draw a run's learning curves from its ``metrics.jsonl``: ``python -m ppo.plot RUN_DIR [--out PNG]``.

Two panels over iterations: the success rate and the share of bad turns (``invalid_json`` plus
``structural_fail``) of the sampled episodes, each with a moving average, and, when given, horizontal lines for
greedy evaluations before and after training (``--before`` / ``--after`` evaluation JSON files).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def read_metrics(path: Path, training_only: bool = True) -> list[dict]:
    """The JSON lines of ``metrics.jsonl``; ``training_only`` drops the line of the starting policy's evaluation."""
    path = path / "metrics.jsonl" if path.is_dir() else path
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError as err:
                raise SystemExit(f"{path} line {number}: not valid JSON ({err})") from None
    if training_only:
        # Iteration -1 holds only the greedy evaluation of the starting policy (eval/*), not a training iteration.
        rows = [r for r in rows if "charts/success_rate" in r]
    if not rows:
        raise SystemExit(f"{path} holds no metrics yet")
    return rows


def moving_average(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot(
    rows: list[dict], out: Path, before: dict | None = None, after: dict | None = None, window: int = 5
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    its = [r["iteration"] for r in rows]
    success = [r["charts/success_rate"] for r in rows]
    bad = [r["env/status/invalid_json"] + r["env/status/structural_fail"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for ax, values, title in (
        (ax1, success, "success rate (sampled episodes)"),
        (ax2, bad, "bad turns (sampled)"),
    ):
        ax.plot(its, values, color="0.75", lw=1, label="per iteration")
        ax.plot(its, moving_average(values, window), lw=2, label=f"moving average ({window})")
        ax.set_title(title)
        ax.set_xlabel("PPO iteration")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    for name, result, style in (("greedy eval before", before, ":"), ("greedy eval after", after, "--")):
        if result:
            ax1.axhline(
                result["success_rate"], ls=style, color="k", label=f"{name}: {result['success_rate']:.2f}"
            )
            share = result["status"]["invalid_json"] + result["status"]["structural_fail"]
            ax2.axhline(share, ls=style, color="k", label=f"{name}: {share:.2f}")
    ax1.legend(loc="lower right", fontsize=8)
    ax2.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m ppo.plot", description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a run's output directory or its metrics.jsonl")
    parser.add_argument("--out", help="PNG to write (default: RUN/success_curve.png)")
    parser.add_argument("--before", help="evaluation JSON of the starting policy")
    parser.add_argument("--after", help="evaluation JSON of the trained policy")
    parser.add_argument("--window", type=int, default=5, help="moving-average window in iterations")
    args = parser.parse_args(argv)
    run = Path(args.run)
    metrics = run / "metrics.jsonl" if run.is_dir() else run
    if not metrics.is_file():
        parser.error(f"{metrics} does not exist: give a run's output directory or its metrics.jsonl")
    if args.window < 1:
        parser.error(f"--window must be >= 1, not {args.window}")
    for name in ("before", "after"):
        if getattr(args, name) and not Path(getattr(args, name)).is_file():
            parser.error(f"--{name} {getattr(args, name)} does not exist")
    out = Path(args.out) if args.out else (run if run.is_dir() else run.parent) / "success_curve.png"
    load = lambda p: json.loads(Path(p).read_text()) if p else None  # noqa: E731
    path = plot(read_metrics(run), out, load(args.before), load(args.after), args.window)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
