"""PPO beside its controls: ``python -m ppo.controls [--iterations N] [--seeds 0 1 2] [--out DIR] [-- TRAIN FLAGS]``.

A learning curve says little alone: how much of it is sampling noise, and how much would a policy drift without any
reward? This runs, one after another (two torch processes on two cores slow each other many times over), and from
one shared warm start (it is keyed by ``--warmstart-seed``, not ``--seed``):

- ``default`` for each seed in ``--seeds``: the trainer as configured;
- ``lr0``: the first seed at policy learning rate 0 (the critic still learns): the policy cannot move, so its curves
  show the noise floor (greedy evaluation must stay exactly flat);
- ``reward0``: the first seed at reward scale 0: only the KL penalty acts, so any change is drift, not learning.

Every run evaluates greedily on the validation split (``--eval-every``), never on the test split. Written to
``--out``: one run folder each, ``controls.json`` (every run's curves) and ``controls.png`` (sampled train success,
greedy validation success and bad turns per iteration). A run that already finished is not run again, so an
interrupted comparison continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from ppo.plot import moving_average, read_metrics


def plan(seeds: list[int]) -> list[tuple[str, list[str]]]:
    """(name, extra trainer flags) of each run."""
    runs = [(f"default-seed{s}", ["--seed", str(s)]) for s in seeds]
    runs.append((f"lr0-seed{seeds[0]}", ["--seed", str(seeds[0]), "--learning-rate", "0"]))
    runs.append((f"reward0-seed{seeds[0]}", ["--seed", str(seeds[0]), "--reward-scale", "0"]))
    return runs


def finished(run_dir: Path, iterations: int) -> bool:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return False
    done = [json.loads(x)["iteration"] for x in path.read_text().splitlines() if x.strip()]
    return iterations - 1 in done


def curves(run_dir: Path) -> dict[str, list]:
    """Per-iteration curves of one run: sampled success and bad turns, greedy eval (iteration, success, bad)."""
    lines = read_metrics(run_dir, training_only=False)
    rows = [r for r in lines if "charts/success_rate" in r]
    evals = [r for r in lines if "eval/success_rate" in r]
    return {
        "iteration": [r["iteration"] for r in rows],
        "success": [r["charts/success_rate"] for r in rows],
        "bad_turns": [r["env/status/invalid_json"] + r["env/status/structural_fail"] for r in rows],
        # An evaluation logged with iteration i ran after i + 1 iterations (-1: before training).
        "eval_after": [r["iteration"] + 1 for r in evals],
        "eval_success": [r["eval/success_rate"] for r in evals],
        "eval_bad_turns": [r["eval/bad_turns"] for r in evals],
    }


def draw(results: dict[str, dict], out: Path, window: int = 5) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for name, c in results.items():
        style = "-" if name.startswith("default") else "--"
        axes[0].plot(c["iteration"], moving_average(c["success"], window), style, label=name)
        axes[1].plot(c["eval_after"], c["eval_success"], style, marker="o", label=name)
        axes[2].plot(c["iteration"], moving_average(c["bad_turns"], window), style, label=name)
    titles = (
        f"sampled train success (moving average {window})",
        "greedy success, validation split",
        f"bad turns, sampled (moving average {window})",
    )
    for ax, title in zip(axes, titles, strict=True):
        ax.set_title(title)
        ax.set_xlabel("PPO iterations")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m ppo.controls", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--iterations", type=int, default=None, help="PPO iterations of every run (default: the preset's)"
    )
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1, 2], help="PPO seeds of the default runs"
    )
    parser.add_argument("--eval-every", type=int, default=5, help="greedy validation every N iterations")
    parser.add_argument("--out", default="runs/controls", help="folder of the runs, the JSON and the figure")
    parser.add_argument("--only", nargs="+", help="run only these of the planned runs (by name)")
    parser.add_argument(
        "train_args", nargs=argparse.REMAINDER, help="after --: flags for every run of ppo.train"
    )
    args = parser.parse_args(argv)
    extra = [a for a in args.train_args if a != "--"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from ppo.infra.config import parse_args

    iterations = args.iterations or parse_args(extra).iterations
    results = {}
    for name, flags in plan(args.seeds):
        if args.only and name not in args.only:
            continue
        run_dir = out / name
        if not finished(run_dir, iterations):
            cmd = [sys.executable, "-m", "ppo.train", "--output-dir", str(run_dir), "--iterations", str(iterations),
                   "--eval-every", str(args.eval_every), *extra, *flags]  # fmt: skip
            if run_dir.exists():
                # A run with a checkpoint continues; one stopped before its first checkpoint starts again.
                cmd += ["--resume", str(run_dir)] if (run_dir / "checkpoints").is_dir() else ["--overwrite"]
            print(f"controls: {name}: {' '.join(cmd[1:])}", flush=True)
            subprocess.run(cmd, check=True)
        results[name] = curves(run_dir)
    (out / "controls.json").write_text(json.dumps(results, indent=1))
    print(f"controls: {draw(results, out / 'controls.png')}")
    for name, c in results.items():
        print(
            f"{name:>20}: sampled success {c['success'][0]:.2f} -> {c['success'][-1]:.2f}, greedy val "
            f"{c['eval_success'][0]:.3f} -> {c['eval_success'][-1]:.3f}, greedy bad turns "
            f"{c['eval_bad_turns'][0]:.3f} -> {c['eval_bad_turns'][-1]:.3f}"
        )
    return results


if __name__ == "__main__":
    main()
