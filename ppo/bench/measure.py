"""Measurements of the benchmark: models with random weights, rollout and update throughput, memory.

Letters: B rows, T token positions.
"""

from __future__ import annotations

import json
import math
import os
import platform
import resource
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from ppo.algo import core
from ppo.rollout.generation import generate_turn, left_pad

MID_SHAPE = {  # ~101M parameters, a quarter of them in the (tied) embeddings as in Qwen3
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_key_value_heads": 4,
    "head_dim": 64,
    "intermediate_size": 2048,
    "vocab_size": 32768,
}
QWEN3_1_7B_SHAPE = {  # config.json of Qwen/Qwen3-1.7B
    "hidden_size": 2048,
    "num_hidden_layers": 28,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "intermediate_size": 6144,
    "vocab_size": 151936,
    "max_position_embeddings": 40960,
    "rope_theta": 1000000.0,
}
GiB = 1024**3
BF16 = torch.bfloat16
TOKENIZER_TEXT = 'Tools return data; the assistant reads it and answers. 0 1 2 3 4 5 6 7 8 9 {}[]:,"\n'


def log(message: str) -> None:
    """Progress on stdout, flushed (the GPU run is watched live)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


# ----- machine and memory ---------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    info = {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": "cpu",
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gb"] = torch.cuda.get_device_properties(0).total_memory / GiB
    return info


def rss_bytes() -> int:
    """Resident memory of this process now (Linux /proc), else its peak so far."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return peak_rss_bytes()


def peak_rss_bytes() -> int:
    """Peak resident memory of this process (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _quant_state_tensors(state: Any) -> Iterable[torch.Tensor]:
    """The tensors a bitsandbytes QuantState holds (absmax, code, and the nested state of double quantization)."""
    if state is None:
        return
    for name in ("absmax", "code", "offset"):
        value = getattr(state, name, None)
        if isinstance(value, torch.Tensor):
            yield value
    yield from _quant_state_tensors(getattr(state, "state2", None))


def parameter_count(module: torch.nn.Module) -> int:
    """Parameters of `module` without LoRA adapters, a 4-bit weight counted by its logical shape (its storage
    packs two per byte)."""
    total = 0
    for name, p in module.named_parameters():
        if "lora_" in name:
            continue
        state = getattr(p, "quant_state", None)
        total += math.prod(state.shape) if state is not None else p.numel()
    return total


def tensor_bytes(modules: Iterable[torch.nn.Module], optimizers: Iterable[torch.optim.Optimizer] = ()) -> int:
    """Bytes of every distinct storage behind the modules' parameters, buffers, 4-bit quantization states and
    the optimizers' state (shared storages, e.g. tied embeddings, count once)."""
    tensors: list[torch.Tensor] = []
    for module in modules:
        for p in module.parameters():
            tensors.append(p)
            tensors.extend(_quant_state_tensors(getattr(p, "quant_state", None)))
        tensors.extend(module.buffers())
    for opt in optimizers:
        for state in opt.state.values():
            tensors.extend(v for v in state.values() if isinstance(v, torch.Tensor))
    seen: dict[tuple[str, int], int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[(str(t.device), storage.data_ptr())] = storage.nbytes()
    return sum(seen.values())


# ----- models ---------------------------------------------------------------------------------------------


def build_random_model(
    out_dir: Path, shape: dict[str, Any], *, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> Path:
    """Save a random-weight Qwen3-shaped causal LM (built on `device` in `dtype`) and a small tokenizer."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from models.tokenizer import train_tokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer([TOKENIZER_TEXT] * 4, vocab_size=320)
    tokenizer.save_pretrained(out_dir)
    settings = {"tie_word_embeddings": True, "max_position_embeddings": 4096, **shape}
    config = Qwen3Config(
        bos_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **settings,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen3ForCausalLM(config).to(dtype)
    model.save_pretrained(out_dir)
    return out_dir


def load(path: Path, *, critic: str = "separate", device: str | None = None, cpu_bf16_base: bool = False):
    """The ActorCritic as training loads it: NF4 base, LoRA r=16 on every linear layer; ``cpu_bf16_base``: the
    base layers computing in bf16 on a CPU with bf16 units, as with ``--cpu-bf16-base``."""
    from models import load_actor_critic
    from ppo.infra.config import Config
    from ppo.infra.setup import base_compute_dtype, default_device

    cfg = Config(cpu_bf16_base=cpu_bf16_base, device=device)
    device = default_device(cfg)
    compute_dtype = base_compute_dtype(cfg, device)
    return load_actor_critic(
        str(path), quantization="nf4", critic=critic, device=device, compute_dtype=compute_dtype
    )


def random_contexts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """`n` prompts of 3/4 to all of `length` random ids (distinct lengths exercise the left padding)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(max(1, 3 * length // 4), length + 1, (n,), generator=g)
    return [torch.randint(10, vocab, (int(k),), generator=g).tolist() for k in lengths]


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """Run `fn` once; return its result and the wall seconds (device work included)."""
    _sync()
    start = time.perf_counter()
    out = fn()
    _sync()
    return out, time.perf_counter() - start


# ----- rollouts -------------------------------------------------------------------------------------------


def hf_generate(model, contexts: list[list[int]], new_tokens: int, eot: int, pad: int) -> int:
    """Plain Hugging Face ``generate`` (full-distribution sampling at temperature 1); returns tokens written."""
    device = next(model.parameters()).device
    ids, mask = left_pad(contexts, pad)
    out = model.generate(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        max_new_tokens=new_tokens,
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        eos_token_id=eot,
        pad_token_id=pad,
    )
    new = out[:, ids.shape[1] :]
    # Rows that finished early are padded with pad_id by generate; count up to and including eot.
    return sum(_turn_length(row, eot) for row in new.tolist())


def _turn_length(row: list[int], eot: int) -> int:
    return row.index(eot) + 1 if eot in row else len(row)


def rollout_throughput(
    ac, contexts: list[list[int]], new_tokens: int, *, per_episode: bool
) -> dict[str, Any]:
    """Generated tokens/s of each rollout engine on the same contexts (policy adapter active, eval mode)."""
    eot, pad = ac.tokenizer.eos_token_id, ac.tokenizer.pad_token_id
    model = ac.model
    engines: dict[str, Callable[[], int]] = {
        "static": lambda: count_tokens(engine_turn(model, contexts, new_tokens, eot=eot, pad=pad).tokens),
        "batched": lambda: count_tokens(
            generate_turn(model, contexts, merge_lora=False, **_gen_kw(new_tokens, eot, pad))
        ),
        "batched_merged": lambda: count_tokens(
            generate_turn(model, contexts, merge_lora=True, **_gen_kw(new_tokens, eot, pad))
        ),
        "batched_hf_generate": lambda: hf_generate(model, contexts, new_tokens, eot, pad),
    }
    if per_episode:
        engines["per_episode_hf_generate"] = lambda: sum(
            hf_generate(model, [c], new_tokens, eot, pad) for c in contexts
        )
    out: dict[str, Any] = {
        "episodes": len(contexts),
        "prompt_tokens": sum(len(c) for c in contexts),
        "max_new_tokens": new_tokens,
    }
    model.eval()
    with ac.policy():
        generate_turn(model, contexts[:2], **_gen_kw(2, eot, pad))  # warm-up: first-call allocations
        for name, run in engines.items():
            tokens, seconds = timed(run)
            out[name] = {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}
            log(f"  rollout {name}: {tokens} tokens in {seconds:.2f} s = {tokens / seconds:,.0f} tokens/s")
    return out


def engine_turn(
    model,
    contexts: list[list[int]],
    new_tokens: int,
    *,
    eot: int,
    pad: int,
    engine: str = "static",
    cuda_graphs: bool = True,
    merge_lora: bool = True,
    max_context: int | None = None,
):
    """One turn of every context with a fresh engine, built inside (copy merged, graphs captured) as a rollout
    builds it; returns the `TurnSample`. ``merge_lora`` applies to the static engine (False: adapter unmerged);
    ``max_context`` defaults to what the turn needs."""
    from ppo.rollout.engine import StaticEngine, make_engine

    max_context = max_context or max(map(len, contexts)) + new_tokens
    kw = {"rows": len(contexts), "max_context": max_context, "pad_id": pad}
    if engine == "static":
        runner = StaticEngine(model, cuda_graphs=cuda_graphs, merge_lora=merge_lora, **kw)
    else:
        runner = make_engine(model, kind=engine, cuda_graphs=cuda_graphs, **kw)
    try:
        rows = list(range(len(contexts)))
        return runner.sample(rows, contexts, max_new_tokens=new_tokens, temperature=1.0, end_of_turn_id=eot)
    finally:
        runner.close()


def _gen_kw(new_tokens: int, eot: int, pad: int) -> dict[str, Any]:
    return {"max_new_tokens": new_tokens, "temperature": 1.0, "end_of_turn_id": eot, "pad_id": pad}


def count_tokens(turns: list[list[int]]) -> int:
    return sum(len(t) for t in turns)


# ----- update ---------------------------------------------------------------------------------------------


def make_optimizer(ac) -> torch.optim.Optimizer:
    """The trainer's optimizer (paged 8-bit AdamW over policy and critic parameters)."""
    from ppo.infra.config import Config
    from ppo.infra.setup import build_optimizer

    return build_optimizer(Config(), ac)


def train_step(ac, optimizer, ids: torch.Tensor, micro: int) -> int:
    """One PPO optimizer step over `ids` (B, T) in micro-batches of `micro` rows; returns tokens processed."""
    optimizer.zero_grad(set_to_none=True)
    ac.train()
    for rows in ids.split(micro):
        mask = torch.ones_like(rows)
        action = torch.zeros(rows.shape, device=rows.device)
        action[:, rows.shape[1] // 4 :] = 1.0  # the first quarter plays the prompt
        out = ac.forward_train(rows, mask)
        logprobs = out["logprobs"].float()
        advantages = torch.randn(rows.shape, device=rows.device, generator=None)
        pg_loss, _ = core.policy_loss(logprobs, logprobs.detach(), advantages, action, clip_eps=0.2)
        returns = torch.randn(rows.shape, device=rows.device)
        values = out["values"].float()
        vf_loss, _ = core.value_loss(values, values.detach(), returns, action, clip_eps=0.2)
        ((pg_loss + 0.5 * vf_loss) * rows.shape[0] / ids.shape[0]).backward()
    optimizer.step()
    return ids.numel()


def update_throughput(ac, optimizer, batch: int, length: int, micro: int, steps: int = 2) -> dict[str, Any]:
    """Tokens/s through forward_train + backward + optimizer step (after one warm-up step)."""
    device = next(ac.model.parameters()).device
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(10, ac.config.vocab_size, (batch, length), generator=g).to(device)
    train_step(ac, optimizer, ids[:micro], micro)
    tokens, seconds = timed(lambda: sum(train_step(ac, optimizer, ids, micro) for _ in range(steps)))
    log(f"  update: {tokens} tokens in {seconds:.2f} s = {tokens / seconds:,.0f} tokens/s")
    return {"batch": batch, "length": length, "micro_batch": micro, "tokens_per_s": tokens / seconds}


def episode_batch(
    vocab: int, pad_id: int, *, episodes: int, prefix: int, suffix: tuple[int, int], seed: int = 0
):
    """A ``RolloutBatch`` shaped like the tiny default's: one prefix every episode shares (the system turn with the
    tools), then a suffix of random length whose second half are actions, one reward on the last token."""
    from ppo.rollout import RolloutBatch
    from ppo.rollout.episodes import Episode, pad_episodes

    g = torch.Generator().manual_seed(seed)
    shared = torch.randint(10, vocab, (prefix,), generator=g).tolist()
    rows = []
    for _ in range(episodes):
        n = int(torch.randint(suffix[0], suffix[1] + 1, (1,), generator=g))
        e = Episode("bench", "", shared + torch.randint(10, vocab, (n,), generator=g).tolist())
        e.action_mask[prefix + n // 2 :] = [1] * (n - n // 2)
        e.scores[-1] = float(torch.rand((), generator=g) < 0.5)
        rows.append(e)
    return RolloutBatch(**pad_episodes(rows, pad_id), episodes=rows, generated_tokens=0, generation_seconds=0.0,
                        env_seconds=0.0)  # fmt: skip


def trainer_update_throughput(
    ac, pad_id: int, *, episodes: int, prefix: int, suffix: tuple[int, int]
) -> dict:
    """Seconds and real tokens/s of the trainer's own update of one batch (``ppo.trainer.update``: the scoring pass,
    advantages, then the PPO epochs with the default settings), after one untimed scoring pass as a warm-up."""
    from ppo.infra.config import Config
    from ppo.infra.setup import build_optimizer
    from ppo.trainer import update

    cfg = Config()
    batch = episode_batch(ac.config.vocab_size, pad_id, episodes=episodes, prefix=prefix, suffix=suffix)
    optimizer = build_optimizer(cfg, ac)
    update.score_rollouts(ac, batch, cfg.micro_batch_size, cfg.temperature)  # warm-up
    scores, scoring_s = timed(lambda: update.score_rollouts(ac, batch, cfg.micro_batch_size, cfg.temperature))
    targets = update.compute_advantages(batch, scores, cfg, kl_coef=0.02)
    generator = torch.Generator().manual_seed(0)
    stats, update_s = timed(lambda: update.ppo_update(ac, optimizer, batch, targets, cfg, generator))
    tokens = int(batch.attention_mask.sum())
    log(f"  trainer update: scoring {scoring_s:.2f} s, PPO epochs {update_s:.2f} s over {tokens} tokens")
    return {
        "episodes": episodes,
        "tokens": tokens,
        "scoring_s": scoring_s,
        "ppo_epochs_s": update_s,
        "ppo_epochs_tokens_per_s": stats["perf/update_tokens"] / update_s,
    }


def warmstart_step_throughput(
    path: Path, *, rows: int, prefix: int, suffix: tuple[int, int], steps: int, pack: bool
) -> dict:
    """Labelled tokens/s of the tiny warm start's supervised steps (``ppo.tiny.warmstart.sft_loss``, its backward,
    gradient clipping and an AdamW step on the full-precision model, under bf16 autocast where the warm start uses
    it) on a batch of ``rows`` demonstrations shaped like the default's: one shared prefix (the tool block), a
    suffix of random length whose second half is labelled. ``pack``: the suffixes packed, else padded."""
    from transformers import AutoModelForCausalLM

    from ppo.infra.config import Config
    from ppo.tiny.warmstart import sft_loss, uses_bf16

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).train()
    vocab, pad = model.config.vocab_size, model.config.pad_token_id or 0
    g = torch.Generator().manual_seed(0)
    shared = torch.randint(10, vocab, (prefix,), generator=g)
    lengths = torch.randint(suffix[0], suffix[1] + 1, (rows,), generator=g).tolist()
    ids = torch.full((rows, prefix + max(lengths)), pad)
    labels = torch.full_like(ids, -100)
    attn = torch.zeros_like(ids)
    for r, n in enumerate(lengths):
        row = torch.cat([shared, torch.randint(10, vocab, (n,), generator=g)])
        ids[r, : prefix + n], attn[r, : prefix + n] = row, 1
        labels[r, prefix + n // 2 : prefix + n] = row[prefix + n // 2 :]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    bf16 = uses_bf16(Config())

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = sft_loss(model, ids, attn, labels, pack=pack)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    step()  # warm-up, and AdamW's state
    _, seconds = timed(lambda: [step() for _ in range(steps)])
    labelled = int((labels != -100).sum()) * steps
    log(f"  warm-start steps ({'packed' if pack else 'padded'}): {seconds / steps:.3f} s a step")
    return {
        "rows": rows,
        "steps": steps,
        "s_per_step": seconds / steps,
        "labelled_tokens_per_s": labelled / seconds,
    }


# ----- memory layouts -------------------------------------------------------------------------------------


def _trained(ac, length: int = 64):
    """An optimizer that has taken one step on `ac` (its state now exists)."""
    optimizer = make_optimizer(ac)
    device = next(ac.model.parameters()).device
    ids = torch.randint(10, ac.config.vocab_size, (2, length), device=device)
    train_step(ac, optimizer, ids, 2)
    return optimizer


def memory_layouts(path: Path) -> dict[str, Any]:
    """Trainer layout vs policy alone vs three independent copies: tensor bytes and resident-memory growth.

    Layouts are built one after another and all kept alive, so each one's RSS growth is its own memory.
    """
    keep: list[Any] = []
    out: dict[str, Any] = {}

    def measure(name: str, build: Callable[[], tuple[list, list]]) -> None:
        before = rss_bytes()
        modules, optimizers = build()
        keep.append((modules, optimizers))
        out[name] = {"tensor_bytes": tensor_bytes(modules, optimizers), "rss_bytes": rss_bytes() - before}
        log(f"  memory {name}: {out[name]['tensor_bytes'] / 2**20:,.1f} MiB of tensors")

    def policy_alone():
        ac = load(path, critic="shared")
        return [ac.model], []

    def trainer():
        ac = load(path, critic="separate")
        return [ac], [_trained(ac)]

    def three_copies():
        policy, critic = load(path, critic="shared"), load(path, critic="shared")
        reference = load(path, critic="shared")  # its adapter is never enabled; only the base is used
        return [policy.model, critic, reference.model.get_base_model()], [_trained(policy), _trained(critic)]

    measure("policy_alone", policy_alone)
    measure("trainer", trainer)
    measure("three_copies", three_copies)
    base = out["policy_alone"]
    for name in ("trainer", "three_copies"):
        out[name]["ratio_vs_policy_alone"] = out[name]["tensor_bytes"] / base["tensor_bytes"]
        out[name]["rss_ratio_vs_policy_alone"] = out[name]["rss_bytes"] / max(base["rss_bytes"], 1)
    return out


# ----- recording -----------------------------------------------------------------------------------------


class Recorder:
    """The results, written to the JSON after every measurement: a run cut short keeps what it measured."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.results: dict[str, Any] = {}

    def attempt(self, section: dict[str, Any], key: str, fn: Callable[[], Any]) -> Any:
        """Store fn()'s result in section[key], or its error as a string: one failure never loses the rest."""
        try:
            section[key] = fn()
        except Exception as exc:  # the benchmark reports every failure and goes on
            log(f"  {key} failed: {type(exc).__name__}: {exc}")
            section[key] = {"error": f"{type(exc).__name__}: {exc}"}
        self.save()
        return section[key]

    def save(self) -> None:
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            text = json.dumps(_jsonable(self.results), indent=2) + "\n"
            self.path.write_text(text, encoding="utf-8")


def _jsonable(value: Any) -> Any:
    """A copy fit for strict JSON: NaN and infinities become null, unknown objects their string."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)
