"""A trained policy as a standard Hugging Face model: ``python -m ppo.export --checkpoint RUN --out DIR``.

    python -m ppo.export --checkpoint runs/tiny-... --out exported/           # merged model, bf16
    python -m ppo.export --checkpoint runs/tiny-... --out adapter/ --adapter-only

The default writes a plain causal-LM folder: the 4-bit base the policy trained on, dequantized, with the policy's
LoRA adapter merged into it (the same merge the rollout engine samples from, ``ppo.rollout.generation.merged_copy``), cast
to ``--dtype`` (bf16 by default), plus the tokenizer with its chat template and the generation config.
``AutoModelForCausalLM.from_pretrained(DIR)`` loads it with no code of this project, and a serving engine that
reads Hugging Face folders serves it. The merge starts from the *dequantized* NF4 weights, not from the original
full-precision base, because those are the weights the adapter was trained against.

``--adapter-only`` writes the policy's PEFT adapter alone (``PeftModel.from_pretrained(base, DIR)``); applied to
a full-precision base it differs from the trained policy by the base's 4-bit rounding.

Both write a ``README.md`` model card: base model, reward matrix, the training run and its evaluation results
(the run's own greedy evaluations from ``metrics.jsonl``, and any ``ppo.evaluate --json`` files given with
``--eval``). The critic and the value head are training state and are not exported.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
from pathlib import Path

DTYPES = ("bfloat16", "float16", "float32")


def export_merged(actor_critic, out: Path, dtype: str) -> None:
    """Write the policy (base dequantized, adapter merged) as a plain model folder with its tokenizer."""
    import torch

    from ppo.rollout.generation import merged_copy

    with actor_critic.policy():
        model = merged_copy(actor_critic.model)  # a new plain model: its config has no quantization
    model = model.to(getattr(torch, dtype))
    if "quantization_config" in vars(model.config):  # None after the merge; a serving engine wants it absent
        del model.config.quantization_config
    model.generation_config = actor_critic.model.get_base_model().generation_config
    model.save_pretrained(out, safe_serialization=True)
    _save_tokenizer(actor_critic, out)


def export_adapter(checkpoint: Path, out: Path, base_model: str) -> None:
    """Copy the policy's PEFT adapter out of a checkpoint, its config naming ``base_model``."""
    from models.actor_critic import ADAPTER_FILE

    shutil.copy2(checkpoint / ADAPTER_FILE, out / ADAPTER_FILE)
    config = json.loads((checkpoint / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = base_model
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")


def _save_tokenizer(actor_critic, out: Path) -> None:
    tokenizer = actor_critic.tokenizer
    side = tokenizer.padding_side
    tokenizer.padding_side = "right"  # the library's default; the rollout's left padding is ours
    try:
        tokenizer.save_pretrained(out)
    finally:
        tokenizer.padding_side = side


def model_card(cfg, checkpoint: Path, base_model: str, *, merged: bool, dtype: str, evals: list[Path]) -> str:
    """The README of an exported folder: what it is, how it was trained, how it scored."""
    from env import RewardConfig
    from ppo.infra.checkpoint import output_dir_of

    run = output_dir_of(checkpoint)
    reward = dataclasses.asdict(RewardConfig())
    nf4 = cfg.quantization == "nf4"
    lines = [
        "---",
        f"base_model: {base_model}",
        "library_name: " + ("transformers" if merged else "peft"),
        "tags: [tool-use, mcp, ppo, qwen-tool]",
        "---",
        "",
        "# Tool-calling policy trained with qwen-tool PPO",
        "",
        (
            f"The base model `{base_model}`{' (4-bit NF4 during training, dequantized)' if nf4 else ''} with the "
            f"policy's LoRA adapter merged in, saved in {dtype}."
            if merged
            else f"The policy's LoRA adapter (PEFT) for `{base_model}`."
            + (
                " It was trained on the 4-bit NF4 base; on a full-precision base it differs from the trained policy "
                "by that rounding."
                if nf4
                else ""
            )
        ),
        "",
        'The model calls tools in the Qwen3/Hermes format (`<tool_call>{"name": ..., "arguments": {...}}'
        "</tool_call>`) with the chat template saved beside it.",
        "",
        "## Training",
        "",
        f"- Run: `{run}`, checkpoint `{checkpoint.name}`",
        f"- Tasks: {cfg.tasks or 'the qwen-tool mock server train split'}; server: {cfg.mcp_server or 'mcp_mock'}",
        f"- PPO with a learned critic and GAE: {cfg.num_episodes} episodes an iteration, learning rate "
        f"{cfg.learning_rate}, {cfg.ppo_epochs} epochs, KL target {cfg.kl_target} per token, seed {cfg.seed}",
        f"- LoRA r={cfg.lora_r}, alpha={cfg.lora_alpha} on every linear layer",
        "- Reward per turn (then scaled by "
        + f"{cfg.reward_scale}): "
        + ", ".join(f"{k} {v:+g}" for k, v in reward.items()),
        "",
        "## Evaluation",
        "",
    ]
    lines += _run_evals(run) + [_eval_row(path) for path in evals]
    if not lines[-1].startswith("|"):
        lines.append("No evaluation recorded (run `python -m ppo.evaluate --checkpoint RUN --json FILE`, then "
                     "export with `--eval FILE`).")  # fmt: skip
    return "\n".join(lines) + "\n"


def _run_evals(run: Path) -> list[str]:
    """Rows of the run's periodic greedy evaluation (``eval/*`` in metrics.jsonl)."""
    path = run / "metrics.jsonl"
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if "eval/success_rate" in record:
                it = record.get("iteration", "?")
                label = "starting policy" if it == -1 else f"after iteration {int(it) + 1}"
                rows.append(f"| run's validation tasks, {label} | {record['eval/success_rate']:.3f} |")
    return ["| greedy evaluation | success rate |", "|---|---|", *rows] if rows else []


def _eval_row(path: Path) -> str:
    result = json.loads(path.read_text())
    where = result.get("split", path.name)
    return f"| `{where}` ({result.get('episodes', '?')} tasks, {path.name}) | {result['success_rate']:.3f} |"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ppo.export", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a checkpoint folder or a run's output directory")
    parser.add_argument("--out", required=True, help="the folder to write (must be empty or absent)")
    parser.add_argument(
        "--adapter-only", action="store_true", help="write the PEFT adapter, not a merged model"
    )
    parser.add_argument("--dtype", default="bfloat16", choices=DTYPES, help="weights of the merged model")
    parser.add_argument("--model", help="the base model, when it moved since training")
    parser.add_argument(
        "--eval", nargs="*", default=[], help="ppo.evaluate --json files to quote in the card"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.is_file():
        parser.error(f"--out {out} is a file; give a folder")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        parser.error(f"--out {out} is not empty; choose another folder or pass --overwrite")
    for path in args.eval:
        if not Path(path).is_file():
            parser.error(f"--eval {path} does not exist")
        try:
            if "success_rate" not in json.loads(Path(path).read_text()):
                parser.error(f"--eval {path} holds no success_rate; give a ppo.evaluate --json file")
        except (ValueError, AttributeError, TypeError):
            parser.error(f"--eval {path} is not a ppo.evaluate --json file")
    from ppo.infra.setup import input_errors

    try:
        _export(args, out)
    except input_errors() as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"exported: {out}")
    return 0


def _export(args, out: Path) -> None:
    from ppo.infra.checkpoint import write_folder_atomically
    from ppo.infra.setup import load_policy, policy_config, prepare_model

    # What policy_config reads beyond --checkpoint and --model: export always takes the run's own settings.
    args.preset, args.mcp_server, args.device, args.tiny_copy_circuit = "tiny", None, "cpu", None
    args.max_new_tokens = args.max_context = 0
    cfg = policy_config(args)
    checkpoint = Path(args.checkpoint)
    if args.adapter_only and not (checkpoint / "adapter_config.json").is_file():
        from ppo.infra.checkpoint import CheckpointError

        raise CheckpointError(f"{checkpoint} has no adapter_config.json: it is not a checkpoint of ppo.train")
    base_model = prepare_model(cfg)
    if not args.adapter_only:
        actor_critic = load_policy(cfg, adapters=checkpoint, device="cpu", model_path=base_model)

    def write(folder: Path) -> None:
        if args.adapter_only:
            export_adapter(checkpoint, folder, base_model)
        else:
            export_merged(actor_critic, folder, args.dtype)
        card = model_card(
            cfg, checkpoint, base_model, merged=not args.adapter_only, dtype=args.dtype,
            evals=[Path(p) for p in args.eval],
        )  # fmt: skip
        (folder / "README.md").write_text(card)

    out.parent.mkdir(parents=True, exist_ok=True)
    write_folder_atomically(out, write)


if __name__ == "__main__":
    sys.exit(main())
