"""How well the tiny base copies before any training: ``python -m ppo.tiny.probe [--seeds 0 1 2]``.

For each wiring seed the tiny base is built wired to copy (``models.tiny.wire_copying``; in a temporary folder, the
cache untouched) and teacher-forced on the first oracle call of every val task, rendered as the policy sees it. At
each token of the call that the circuit could copy (a ``copy_tokens`` token that occurs in the user's prompt): is the
base's argmax that token? Counted per category, and apart for the first token of a span (the token before it not
copyable), which the circuit can only find by the tokens before it. This measures the circuit, not a policy: the
README's figures for changes to the circuit come from here, and each change was then measured after PPO.
"""

from __future__ import annotations

import argparse
import collections
import tempfile


def copy_accuracy(model, tokenizer, tasks: list[dict], tools: list[dict]) -> dict[str, list[int]]:
    """Per category: [copyable targets, copied, span-first targets, span-first copied] over the first oracle call
    of each task (teacher-forced argmax)."""
    import torch

    from env.parsing import call_text
    from models.tiny import copy_tokens
    from ppo.rollout import ChatFormat

    chat = ChatFormat(tokenizer)
    copyable = copy_tokens(tokenizer)
    counts: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0, 0, 0])
    for task in tasks:
        call = task["oracle"][0]
        # Laid out as a rollout lays out the first turn (and the warm start a demonstration).
        prompt_ids = chat.prompt_ids([{"role": "user", "content": task["prompt"]}], tools)
        ids = [*prompt_ids, *chat.encode(call_text(call["name"], call["arguments"])), chat.end_of_turn_id]
        with torch.no_grad():
            predicted = model(torch.tensor([ids])).logits[0].argmax(-1).tolist()
        in_prompt = set(chat.encode(task["prompt"]))
        row = counts[task["category"]]
        for t in range(len(prompt_ids), len(ids)):
            if not (copyable[ids[t]] and ids[t] in in_prompt):
                continue
            hit = int(predicted[t - 1] == ids[t])
            row[0] += 1
            row[1] += hit
            if not copyable[ids[t - 1]]:
                row[2] += 1
                row[3] += hit
    return dict(counts)


def main(argv: list[str] | None = None) -> dict[int, dict[str, list[int]]]:
    parser = argparse.ArgumentParser(prog="python -m ppo.tiny.probe", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="wiring seeds of the base")
    args = parser.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import mcp_mock
    from models.tiny import build_tiny
    from ppo.tiny.corpus import mock_tools, tokenizer_texts

    texts, tools, tasks = tokenizer_texts(), mock_tools(), mcp_mock.load_tasks("val")
    results = {}
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as folder:
            build_tiny(folder, texts, seed=seed, copy_circuit=True)
            tokenizer = AutoTokenizer.from_pretrained(folder)
            model = AutoModelForCausalLM.from_pretrained(folder).eval()
            counts = copy_accuracy(model, tokenizer, tasks, tools)
        results[seed] = counts
        every = [sum(row[i] for row in counts.values()) for i in range(4)]
        print(f"wiring seed {seed}: copied / copyable (first token of a span)")
        for name, row in [*sorted(counts.items()), ("all", every)]:
            print(
                f"  {name:<11} {row[1] / max(row[0], 1):.2f} of {row[0]:>4}   ({row[3] / max(row[2], 1):.2f} of {row[2]})"
            )
    return results


if __name__ == "__main__":
    main()
