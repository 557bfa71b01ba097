"""Rollout engines: the object `collect_rollouts` asks to sample each turn of a batch of episodes.

Letters: B rows (slots of the cache), T new tokens of a prefill, S cache positions, H query heads, K key/value
heads, G = H / K query heads per key/value head, D head size, V vocabulary.

`StaticEngine` is the fast path, for the Llama family of decoders (Qwen3, Qwen2, Llama; Qwen3-1.7B is the
default policy). It runs a copy of the policy made once per rollout, its 4-bit base dequantized and the active
LoRA adapter merged in (`ppo.rollout.generation.merged_copy`; ``merge_lora=False`` keeps the adapter beside the base,
computed as peft computes it), its own attention over a KV cache allocated once per rollout, and on a GPU a CUDA
graph per decoding shape:

- **one cache for the whole rollout.** Each episode owns a slot (a row of the cache) from its first turn to its
  last. A later turn prefills only the tokens appended since (the tool's answer and the next turn's header): the
  system prompt, the task and earlier turns are never computed twice. A slot's valid tokens are positions
  ``0 .. n-1``; positions are the RoPE positions, so there is no padding inside the cache.
- **rows that finish stop costing compute.** Active slots are kept at the front of the cache (a permutation of
  the slots, a copy of the cache layer by layer); a decoding step runs on the first ``b`` slots only.
- **a decoding step is one CUDA graph replay** (`torch.cuda.CUDAGraph`), captured for each (rows, attended
  positions) bucket: powers of two, so at most ~2x the work of the exact shape and a handful of graphs. The graph
  embeds the token, runs every layer, samples the next token, writes it to a device-side history and advances
  the lengths, so the host only replays and, every ``check_every`` steps, reads which rows have ended. Replaying
  a whole step as one graph removes the per-kernel launch overhead that bounded the Hugging Face loop (47 ms a
  step on an H100; ``python -m ppo.bench`` compares the engines).
- **sampling in the graph**: the exponential race, ``argmax_i p_i / E_i`` with ``E_i ~ Exp(1)`` i.i.d., draws
  ``i`` with probability ``p_i`` (the Gumbel-max trick in another form; e.g. Huijben et al. 2022, "A Review of
  the Gumbel-max Trick"), inside the graph. ``torch.multinomial`` draws a single sample by the same race, so with
  one seed the static and loop engines draw the same tokens on the CPU.
- **tool calls start early**: ``on_turn_end`` reports each turn as soon as it is known to be complete, and the
  rollout starts that episode's tool calls while the longer turns are still being sampled.

Contract of a slot's cache: positions ``>= n`` hold garbage (stale values, tokens sampled after a row ended,
pad tokens of a prefill) that the mask ``key position <= query position`` never lets a query see; every
position is written by a real token before any query can attend to it. A write that must go nowhere (pad tokens,
idle slots inside a bucket) goes to the extra last position ``S``, the *bin*, which is never attended.
Tests fill the garbage with large values and check that nothing changes (``tests/test_engine.py``).

`LoopEngine` wraps `ppo.rollout.generation.sample_turn` (Hugging Face forward with a dynamic cache) for any other
architecture; it recomputes each context from scratch every turn.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from typing import Protocol

import torch
from torch import nn

from ppo.rollout.generation import TurnSample, merged_copy, sample_turn

SUPPORTED_TYPES = ("qwen3", "qwen2", "llama")
"""``config.model_type`` values whose decoder layers `StaticEngine` reimplements (pre-norm RMSNorm, RoPE,
grouped-query attention with an optional per-head q/k RMSNorm, a gated MLP called as the model's own module)."""


STATIC_ROPE = {None, "default", "linear", "llama3", "yarn"}
"""RoPE variants whose cos/sin tables depend on the position alone, so one table serves the whole rollout."""


TurnEnd = Callable[[int, list[int]], None]
"""``on_turn_end(k, tokens)``: request k's turn is complete (its final tokens), though others may still run."""


class Engine(Protocol):
    """What `collect_rollouts` needs: one turn for some of its episodes, then `close`."""

    def sample(
        self,
        rows: list[int],
        contexts: list[list[int]],
        *,
        max_new_tokens: int,
        temperature: float,
        end_of_turn_id: int,
        on_turn_end: TurnEnd | None = None,
    ) -> TurnSample: ...

    def close(self) -> None: ...


def static_support(model: nn.Module) -> str | None:
    """None when `StaticEngine` can run `model` (a PeftModel or a causal LM), else the reason it cannot."""
    config = model.config
    kind = getattr(config, "model_type", None)
    if kind not in SUPPORTED_TYPES:
        return f"model_type {kind!r} is not one of {SUPPORTED_TYPES}"
    if getattr(config, "use_sliding_window", False):
        return "sliding-window attention is on"
    if "sliding_attention" in (getattr(config, "layer_types", None) or ()):
        return "some layers use sliding-window attention"
    if any(getattr(c, "use_dora", False) for c in getattr(model, "peft_config", {}).values()):
        return "DoRA adapters are not plain LoRA"
    rope = getattr(config, "rope_scaling", None) or getattr(config, "rope_parameters", None) or {}
    kind = rope.get("rope_type", rope.get("type")) if isinstance(rope, dict) else None
    if kind not in STATIC_ROPE:
        # e.g. dynamic NTK or longrope: Hugging Face recomputes the frequencies from the sequence length.
        return (
            f"RoPE type {kind!r} changes with the sequence length (supported: {sorted(STATIC_ROPE - {None})})"
        )
    return None


def _static_or_loop(
    model: nn.Module, *, rows: int, max_context: int, pad_id: int, cuda_graphs: bool
) -> Engine:
    reason = static_support(model)
    if reason is None:
        return StaticEngine(model, rows=rows, max_context=max_context, cuda_graphs=cuda_graphs, pad_id=pad_id)
    warnings.warn(f"engine 'static' cannot run this model ({reason}); using 'loop'.", stacklevel=3)
    return LoopEngine(model, pad_id)


def _loop(model: nn.Module, *, rows: int, max_context: int, pad_id: int, cuda_graphs: bool) -> Engine:
    return LoopEngine(model, pad_id)


# The rollout engines by name (``--engine``; ``Config.validate`` checks against it). A new engine implements
# ``Engine`` and registers a factory here.
ENGINES: dict[str, Callable[..., Engine]] = {"static": _static_or_loop, "loop": _loop}


def make_engine(
    model: nn.Module, *, kind: str, rows: int, max_context: int, pad_id: int, cuda_graphs: bool = True
) -> Engine:
    """The engine of one rollout of `rows` episodes. Call inside the policy's role (the adapter to merge).

    ``kind``: a name of ``ENGINES``: ``"static"`` (`StaticEngine`; falls back to ``"loop"`` with a warning when the
    architecture is not supported) or ``"loop"`` (`LoopEngine`).
    """
    if kind not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {kind!r}.")
    return ENGINES[kind](model, rows=rows, max_context=max_context, pad_id=pad_id, cuda_graphs=cuda_graphs)


class LoopEngine:
    """`ppo.rollout.generation.sample_turn` behind the `Engine` interface (any architecture, no state across turns)."""

    def __init__(self, model: nn.Module, pad_id: int | None = None) -> None:
        self.model = model
        self.pad_id = _pad_id(model) if pad_id is None else pad_id

    def sample(
        self, rows, contexts, *, max_new_tokens, temperature, end_of_turn_id, on_turn_end=None
    ) -> TurnSample:
        out = sample_turn(
            self.model,
            contexts,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            end_of_turn_id=end_of_turn_id,
            pad_id=self.pad_id,
        )
        for k, tokens in enumerate(out.tokens):  # all turns end together here
            if on_turn_end is not None:
                on_turn_end(k, tokens)
        return out

    def close(self) -> None:
        self.model = None


def _pad_id(model: nn.Module) -> int:
    pad = getattr(model.config, "pad_token_id", None)
    return 0 if pad is None else int(pad)


def _bucket(n: int, floor: int, cap: int) -> int:
    """The smallest power of two >= max(n, floor), capped at `cap` (itself >= n)."""
    return min(cap, max(floor, 1 << max(0, math.ceil(math.log2(max(n, 1))))))


class StaticEngine:
    """Sampling with a per-rollout KV cache, slot compaction and CUDA graphs (see the module docstring).

    ``rows`` slots (one per episode of the rollout); ``max_context`` bounds a slot's length (the cache grows to
    it on demand, in steps of ``grow``). ``cuda_graphs`` (CUDA only) replays a captured graph per decoding step;
    without it (and on the CPU) the same step runs eagerly. ``buckets`` (default: as the graphs) runs each step on
    the bucketed shapes and reads the ended rows every ``check_every`` steps, as the graphs do; without it a step
    runs on exactly the rows still writing and the ended rows are read after every step. ``generator`` seeds
    eager draws (graph replays draw from the device's default generator). ``merge_lora`` merges the adapter into
    the dense weights: one matmul per linear layer instead of three. Without it the adapters run beside the base
    as peft runs them. The merge rounds the adapter's update to bf16 on a GPU; ``python -m ppo.bench`` measures
    both, speed and how far the sampler's log-probs are from the policy's (see the README).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        rows: int,
        max_context: int,
        cuda_graphs: bool = True,
        buckets: bool | None = None,
        check_every: int = 8,
        grow: int = 256,
        prefill_tokens: int = 8192,
        generator: torch.Generator | None = None,
        pad_id: int | None = None,
        merge_lora: bool = True,
    ) -> None:
        reason = static_support(model)
        if reason is not None:
            raise ValueError(f"StaticEngine cannot run this model: {reason}.")
        if rows < 1 or max_context < 2:
            raise ValueError(f"need rows >= 1 and max_context >= 2, got {rows} and {max_context}.")
        self.lm = dense_copy(model, merge_lora)
        inner = self.lm.get_decoder() if hasattr(self.lm, "get_decoder") else self.lm.model
        self.embed, self.layers, self.norm = inner.embed_tokens, list(inner.layers), inner.norm
        self.rotary, self.head = inner.rotary_emb, self.lm.get_output_embeddings()
        cfg = self.lm.config
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.scale = self.head_dim**-0.5
        self.device = self.embed.weight.device
        self.dtype = self.embed.weight.dtype
        self.rows, self.max_context, self.grow = rows, max_context, grow
        self.check_every, self.prefill_tokens, self.generator = check_every, prefill_tokens, generator
        self.graphs_on = cuda_graphs and self.device.type == "cuda"
        self.fp32_scores = fp32_scores_supported(self.device, self.dtype)
        self.bucketed = self.graphs_on if buckets is None else buckets
        self.pad_id = _pad_id(model) if pad_id is None else pad_id
        self.prefilled_tokens = 0  # tokens fed by prefills over the rollout (earlier turns are not fed again)
        # Per slot: the token ids its cache holds (a prefix of the episode's context) and which row owns it.
        self.cached: list[list[int]] = [[] for _ in range(rows)]
        self.slot_of = list(range(rows))  # episode row -> slot
        self.row_of = list(range(rows))  # slot -> episode row
        self.capacity = 0  # S: attended positions; the cache has S + 1 (the bin)
        self.width = 0  # columns of the device-side token history
        self.k_cache: list[torch.Tensor] = []
        self.v_cache: list[torch.Tensor] = []
        self.graphs: dict[tuple[int, int, bool], torch.cuda.CUDAGraph] = {}
        self.pool = None
        self.side = None  # the stream graph warm-ups run on
        long = dict(dtype=torch.long, device=self.device)
        self.tok_in = torch.zeros(rows, **long)  # the token each slot feeds at the next step
        # The position each slot's next token goes to (= the slot's length); the bin when idle.
        self.pos_in = torch.zeros(rows, **long)
        self.step_at = torch.zeros(1, **long)  # history column of the next step
        self.inv_temp = torch.ones(1, dtype=torch.float32, device=self.device)
        self.slot_range = torch.arange(rows, **long)

    # ----- public ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def sample(
        self,
        rows: list[int],
        contexts: list[list[int]],
        *,
        max_new_tokens: int,
        temperature: float,
        end_of_turn_id: int,
        on_turn_end: TurnEnd | None = None,
    ) -> TurnSample:
        """One turn for episode `rows` (indices in ``range(self.rows)``) whose full token lists are `contexts`.

        Returns each row's new ids up to and including ``end_of_turn_id`` (absent when the row ran out of
        ``max_new_tokens``) and the log-prob of each under ``softmax(logits / temperature)`` (greedy: at 1).
        ``on_turn_end(k, tokens)`` is called once per request as soon as its turn is known complete (within
        ``check_every`` steps of its end), while longer turns go on: the rollout starts its tool calls there.
        """
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}.")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}.")
        if len(rows) != len(contexts) or len(set(rows)) != len(rows):
            raise ValueError("rows and contexts must pair up, one context per distinct row.")
        if any(not c for c in contexts) or any(not 0 <= r < self.rows for r in rows):
            raise ValueError(f"every context needs a token and every row must be in range({self.rows}).")
        longest = max(len(c) for c in contexts) + max_new_tokens
        self._ensure(capacity=longest, width=max_new_tokens)
        self._front(rows)  # slots 0 .. len(rows)-1 now belong to `rows`, in that order
        greedy = temperature == 0
        self.inv_temp.fill_(1.0 if greedy else 1.0 / temperature)
        n = len(rows)
        self.pos_in.fill_(self.capacity)  # everything idle writes to the bin ...
        first, first_logp = self._prefill(contexts, greedy)  # ... the prefill sets pos_in of slots 0 .. n-1
        tokens = [[t] for t in first.tolist()]
        logprobs = [[lp] for lp in first_logp.tolist()]
        self.tok_in[:n] = first
        self.step_at.zero_()

        def fed(i: int) -> int:
            """Tokens of request i in the cache: its context and every sampled token but the last (which goes
            to position fed(i) at the next step if the turn goes on)."""
            return len(contexts[i]) + len(tokens[i]) - 1

        # Front slot s plays request alive[s].
        alive = self._still_writing(list(range(n)), tokens, end_of_turn_id, positions=max(map(fed, range(n))))
        reported: set[int] = set()

        def report(requests: Iterable[int]) -> None:
            for i in requests:
                if on_turn_end is not None and i not in reported:
                    reported.add(i)
                    on_turn_end(i, tokens[i])

        report(sorted(set(range(n)) - set(alive)))  # turns that ended at their first token
        done_steps = 1
        while alive and done_steps < max_new_tokens:
            run = min(self.check_every if self.bucketed else 1, max_new_tokens - done_steps)
            start_col = done_steps - 1  # = step_at: the history column of this run's first step
            span = max(map(fed, alive)) + run  # positions any query of these steps may attend
            for _ in range(run):
                self._step(len(alive), span, greedy)
            done_steps += run
            new_tok = self.hist_tok[: len(alive), start_col : start_col + run].tolist()
            new_logp = self.hist_logp[: len(alive), start_col : start_col + run].tolist()
            for slot, i in enumerate(alive):
                for tok, lp in zip(new_tok[slot], new_logp[slot], strict=True):
                    tokens[i].append(tok)
                    logprobs[i].append(lp)
                    if tok == end_of_turn_id:
                        break  # later draws of this row were made after its turn ended: dropped
            before, alive = alive, self._still_writing(alive, tokens, end_of_turn_id, max(map(fed, alive)))
            report(sorted(set(before) - set(alive)))
        report(range(n))  # the rest ran out of max_new_tokens
        for i, (row, ctx) in enumerate(zip(rows, contexts, strict=True)):
            # Every sampled token but the last was fed (the last one ended the turn or the budget).
            self.cached[self.slot_of[row]] = ctx + tokens[i][:-1]
        return TurnSample(tokens, logprobs)

    def close(self) -> None:
        """Free the cache, the graphs and the merged copy (call when the rollout ends)."""
        self.graphs.clear()
        self.k_cache, self.v_cache, self.pool, self.side = [], [], None, None
        self.lm = self.embed = self.layers = self.norm = self.rotary = self.head = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ----- buffers and slots -------------------------------------------------------------------------------

    def _ensure(self, *, capacity: int, width: int) -> None:
        """Grow the cache to at least `capacity` positions and the history to `width` columns (drops graphs)."""
        if capacity > self.max_context + 1:
            raise ValueError(f"a turn would reach {capacity} tokens, over max_context={self.max_context}.")
        if capacity > self.capacity:
            new = min(self.max_context + 1, -(-capacity // self.grow) * self.grow)
            shape = (self.rows, self.kv_heads, new + 1, self.head_dim)
            for cache in (self.k_cache, self.v_cache):
                for layer in range(len(self.layers)):
                    grown = torch.zeros(shape, dtype=self.dtype, device=self.device)
                    if len(cache) > layer:
                        grown[:, :, : self.capacity].copy_(cache[layer][:, :, : self.capacity])
                        cache[layer] = grown
                    else:
                        cache.append(grown)
            positions = torch.arange(new + 1, device=self.device)[None]
            probe = torch.zeros(1, dtype=self.dtype, device=self.device)
            cos, sin = self.rotary(probe, positions)
            self.cos, self.sin = cos[0], sin[0]  # (S + 1, D), exactly the model's own tables
            self.capacity = new
            self.graphs.clear()
        if width + self.check_every > self.width:
            self.width = width + self.check_every
            self.hist_tok = torch.zeros(self.rows, self.width, dtype=torch.long, device=self.device)
            self.hist_logp = torch.zeros(self.rows, self.width, dtype=torch.float32, device=self.device)
            self.graphs.clear()

    def _permute(self, order: list[int], positions: int) -> None:
        """Slot ``s`` takes the contents of slot ``order[s]`` for ``s < len(order)`` (the other slots stay).

        Only cache positions ``< positions`` are moved: every slot's valid tokens lie below it."""
        m = len(order)
        if order == list(range(m)):
            return
        index = torch.tensor(order, device=self.device)
        for cache in (*self.k_cache, *self.v_cache):
            held = cache[:m, :, :positions]
            held.copy_(held[index])  # one layer at a time: the temporary is the moved part of one layer
        for buf in (self.tok_in, self.pos_in, self.hist_tok, self.hist_logp):
            buf[:m] = buf[index]
        self.cached[:m] = [self.cached[s] for s in order]
        self.row_of[:m] = [self.row_of[s] for s in order]
        for slot in range(m):
            self.slot_of[self.row_of[slot]] = slot

    def _front(self, rows: list[int]) -> None:
        """Move the slots of `rows` to the front, in the order given."""
        chosen = [self.slot_of[r] for r in rows]
        taken = set(chosen)
        rest = [s for s in range(self.rows) if s not in taken]
        self._permute(chosen + rest, positions=max(len(c) for c in self.cached))

    def _still_writing(
        self, alive: list[int], tokens: list[list[int]], end_of_turn_id: int, positions: int
    ) -> list[int]:
        """Compact the front slots (slot s plays request ``alive[s]``) to the requests whose turn goes on.

        The slots of the rows that ended move behind, keeping their cache (valid below `positions`); they write
        to the bin from now on."""
        keep = [s for s, i in enumerate(alive) if tokens[i][-1] != end_of_turn_id]
        if len(keep) < len(alive):
            kept = set(keep)
            others = [s for s in range(len(alive)) if s not in kept]
            self._permute(keep + others, positions)
            self.pos_in[len(keep) :] = self.capacity
        return [alive[s] for s in keep]

    # ----- the model ---------------------------------------------------------------------------------------

    def _prefill(self, contexts: list[list[int]], greedy: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed each front slot the tokens of its context it does not hold yet; sample each row's first token."""
        starts, chunks = [], []
        for slot, ctx in enumerate(contexts):
            held = self.cached[slot]
            keep = len(held) if len(held) < len(ctx) and ctx[: len(held)] == held else 0
            # The last context token is always fed: its logits draw the first new token.
            starts.append(keep)
            chunks.append(ctx[keep:])
        self.prefilled_tokens += sum(len(c) for c in chunks)
        firsts, logps = [], []
        slot = 0
        while slot < len(contexts):
            # Rows of similar size go together so that one prefill forward holds at most ~prefill_tokens.
            end = slot + 1
            width = len(chunks[slot])
            while (
                end < len(contexts) and max(width, len(chunks[end])) * (end + 1 - slot) <= self.prefill_tokens
            ):
                width = max(width, len(chunks[end]))
                end += 1
            tok, lp = self._prefill_rows(slot, starts[slot:end], chunks[slot:end], greedy)
            firsts.append(tok)
            logps.append(lp)
            slot = end
        return torch.cat(firsts), torch.cat(logps)

    def _prefill_rows(
        self, first_slot: int, starts: list[int], chunks: list[list[int]], greedy: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward over slots ``first_slot ..`` on right-padded chunks; returns first tokens and log-probs."""
        b, t = len(chunks), max(len(c) for c in chunks)
        dev = self.device
        ids = torch.full((b, t), self.pad_id, dtype=torch.long)
        for r, chunk in enumerate(chunks):
            ids[r, : len(chunk)] = torch.tensor(chunk, dtype=torch.long)
        ids = ids.to(dev)
        start = torch.tensor(starts, device=dev)[:, None]  # (B, 1)
        count = torch.tensor([len(c) for c in chunks], device=dev)[:, None]  # (B, 1)
        offs = torch.arange(t, device=dev)[None]  # (1, T)
        real = offs < count  # (B, T)
        pos = torch.where(real, start + offs, self.capacity)  # (B, T); pad tokens go to the bin
        span = int((start + count).max())  # attended positions
        allowed = torch.arange(span, device=dev)[None, None] <= (start + offs)[..., None]  # (B, T, span)
        slots = torch.arange(first_slot, first_slot + b, device=dev)[:, None]  # (B, 1)
        cos, sin = self.cos[pos], self.sin[pos]  # (B, T, D)
        x = self.embed(ids)  # (B, T, hidden)
        for layer, (kc, vc) in enumerate(zip(self.k_cache, self.v_cache, strict=True)):
            block = self.layers[layer]
            q, k, v = self._qkv(block, x, cos, sin)  # (B, T, H, D), (B, T, K, D) x2
            kc[slots, :, pos] = k  # advanced indices (B, T) around a slice: values are (B, T, K, D)
            vc[slots, :, pos] = v
            keys = kc[first_slot : first_slot + b, :, :span]  # (B, K, span, D)
            values = vc[first_slot : first_slot + b, :, :span]
            group = self.heads // self.kv_heads
            attn = nn.functional.scaled_dot_product_attention(
                q.transpose(1, 2),  # (B, H, T, D)
                keys.repeat_interleave(group, dim=1),
                values.repeat_interleave(group, dim=1),
                attn_mask=allowed[:, None],
                scale=self.scale,
            )  # (B, H, T, D)
            x = self._finish_layer(block, x, attn.transpose(1, 2).reshape(b, t, -1))
        last = x[torch.arange(b, device=dev), count[:, 0] - 1]  # (B, hidden): each row's last real token
        self.pos_in[first_slot : first_slot + b] = (start + count)[:, 0]
        return self._draw(self.head(self.norm(last)), greedy, seeded=True)

    def _qkv(self, block: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Pre-norm, projections, optional per-head q/k norm and RoPE of one layer. x: (..., hidden)."""
        attn = block.self_attn
        h = block.input_layernorm(x)
        q = attn.q_proj(h).unflatten(-1, (self.heads, self.head_dim))  # (..., H, D)
        k = attn.k_proj(h).unflatten(-1, (self.kv_heads, self.head_dim))  # (..., K, D)
        v = attn.v_proj(h).unflatten(-1, (self.kv_heads, self.head_dim))
        if hasattr(attn, "q_norm"):  # Qwen3: RMSNorm over each head before RoPE
            q, k = attn.q_norm(q), attn.k_norm(k)
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
        return _rope(q, cos, sin), _rope(k, cos, sin), v

    def _finish_layer(self, block: nn.Module, x: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """Output projection, residual, post-attention norm, the model's own MLP module, residual."""
        x = x + block.self_attn.o_proj(attn_out)
        return x + block.mlp(block.post_attention_layernorm(x))

    def _decode_step(self, b: int, span: int, greedy: bool, seeded: bool) -> None:
        """One token for the first `b` slots, attending positions ``< span``: the body a CUDA graph captures."""
        tok, pos = self.tok_in[:b], self.pos_in[:b]  # (B,), (B,)
        x = self.embed(tok)  # (B, hidden)
        cos, sin = self.cos[pos], self.sin[pos]  # (B, D)
        slots = self.slot_range[:b]
        hidden = (
            torch.arange(span, device=self.device)[None] > pos[:, None]
        )  # (B, span): the future and garbage
        group = self.heads // self.kv_heads
        for layer, (kc, vc) in enumerate(zip(self.k_cache, self.v_cache, strict=True)):
            block = self.layers[layer]
            q, k, v = self._qkv(block, x, cos, sin)  # (B, H, D), (B, K, D) x2
            kc[slots, :, pos] = k
            vc[slots, :, pos] = v
            q = q.view(b, self.kv_heads, group, self.head_dim)  # (B, K, G, D): no copy of keys per group
            scores = _scores(q, kc[:b, :, :span], self.scale, self.fp32_scores)  # (B, K, G, span)
            scores = scores.masked_fill(hidden[:, None, None], float("-inf"))
            probs = scores.softmax(-1).to(self.dtype)
            out = (probs @ vc[:b, :, :span]).reshape(b, -1)  # (B, H * D)
            x = self._finish_layer(block, x, out)
        new, logp = self._draw(self.head(self.norm(x)), greedy, seeded=seeded)
        col = self.step_at.expand(b)
        self.hist_tok[slots, col] = new
        self.hist_logp[slots, col] = logp
        self.tok_in[:b] = new
        self.pos_in[:b] = torch.clamp(pos + 1, max=self.capacity)
        self.step_at.add_(1)

    def _draw(self, logits: torch.Tensor, greedy: bool, *, seeded: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Next id per row from (B, V) logits by the exponential race (greedy: argmax); ids and log-probs."""
        logp = torch.log_softmax(logits.float() * self.inv_temp, dim=-1)  # (B, V)
        if greedy:
            new = logits.argmax(dim=-1)
        else:
            race = torch.empty_like(logp).exponential_(generator=self.generator if seeded else None)
            # E = 0 (a uniform draw of exactly 0 on the CPU) would pick its token whatever its probability;
            # CUDA's sampler already bounds E below by eps / 2, the CPU's is bounded here the same way.
            race.clamp_min_(torch.finfo(race.dtype).eps / 2)
            new = (logp - race.log()).argmax(dim=-1)  # argmax p / E
        return new, logp.gather(-1, new[:, None]).squeeze(-1)

    def _step(self, b: int, span: int, greedy: bool) -> None:
        """Run one decoding step: exact shapes, bucketed shapes, or the replay of the CUDA graph of its bucket."""
        if not self.bucketed:
            self._decode_step(b, span, greedy, seeded=True)
            return
        rows = _bucket(b, 1, self.rows)
        positions = _bucket(span, 128, self.capacity)
        if not self.graphs_on:
            self._decode_step(rows, positions, greedy, seeded=True)
            return
        key = (rows, positions, greedy)
        if key not in self.graphs:
            self.graphs[key] = self._capture(rows, positions, greedy)
        self.graphs[key].replay()

    def _capture(self, b: int, span: int, greedy: bool) -> torch.cuda.CUDAGraph:
        """Capture `_decode_step` for a bucket. The warm-up run's writes are those of the first replay."""
        saved = (self.tok_in.clone(), self.pos_in.clone(), self.step_at.clone())
        if self.side is None:  # one side stream: blocks freed by a warm-up are reused by the next one
            self.side = torch.cuda.Stream()
        side = self.side
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._decode_step(b, span, greedy, seeded=False)  # warm-up: kernels chosen, workspaces allocated
        torch.cuda.current_stream().wait_stream(side)
        for buf, old in zip((self.tok_in, self.pos_in, self.step_at), saved, strict=True):
            buf.copy_(old)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self._decode_step(b, span, greedy, seeded=False)
        for buf, old in zip((self.tok_in, self.pos_in, self.step_at), saved, strict=True):
            buf.copy_(old)  # capture does not run the kernels, but restore anyway: replay starts from here
        return graph


@torch.no_grad()
def dense_copy(model: nn.Module, merge_lora: bool) -> nn.Module:
    """The model for sampling: the base dequantized once, the active LoRA adapter merged in or kept beside it."""
    copy = merged_copy(model, merge_adapters=merge_lora).eval()  # the same object when nothing to dequantize
    if merge_lora or copy is model:
        return copy
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    for name, module in base.named_modules():
        if not isinstance(module, LoraLayer) or module.disable_adapters or module.merged:
            continue
        # (A, s * B): the scale folded into B once (in the adapter's fp32) rather than applied at every step.
        adapters = [
            (module.lora_A[a].weight, module.lora_B[a].weight * float(module.scaling[a]))
            for a in module.active_adapters
            if a in module.lora_A
        ]
        if adapters:
            owner, _, leaf = name.rpartition(".")
            parent = copy.get_submodule(owner)
            setattr(parent, leaf, _LoRALinear(getattr(parent, leaf), adapters))
    return copy


class _LoRALinear(nn.Module):
    """A dense linear layer plus unmerged LoRA adapters, computed as peft computes them: the low-rank path in the
    adapter's dtype (fp32), cast to the layer's output dtype and added (Hu et al. 2021, "LoRA", eq. 3)."""

    def __init__(self, base: nn.Module, adapters: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        super().__init__()
        self.base = base
        self.adapters = adapters  # (A (r, in), scale * B (out, r)) per active adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        for a, scaled_b in self.adapters:
            low = nn.functional.linear(nn.functional.linear(x.to(a.dtype), a), scaled_b)
            y = y + low.to(y.dtype)
        return y


def _scores(q: torch.Tensor, keys: torch.Tensor, scale: float, fp32_bmm: bool) -> torch.Tensor:
    """fp32 attention scores of (B, K, G, D) queries on (B, K, S, D) keys (a view of the cache): (B, K, G, S).

    With `fp32_bmm` the products are accumulated and kept in fp32 (``torch.bmm(..., out_dtype=float32)``, as
    fused attention kernels do); else they are rounded to the inputs' dtype first, then widened."""
    b, k, g, d = q.shape
    if fp32_bmm:
        flat = keys.reshape(b * k, keys.shape[2], d).transpose(1, 2)  # (B K, D, S), still a view of the cache
        return torch.bmm(q.reshape(b * k, g, d), flat, out_dtype=torch.float32).view(b, k, g, -1) * scale
    return (q @ keys.transpose(-1, -2)).float() * scale


def fp32_scores_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch.bmm(..., out_dtype=float32)`` runs here on 16-bit inputs (CUDA builds of torch >= 2.8):
    attention scores then skip the rounding to bf16 that the plain matmul's output would take."""
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return False
    try:
        probe = torch.ones(1, 2, 2, dtype=dtype, device=device)
        return torch.bmm(probe, probe, out_dtype=torch.float32).dtype == torch.float32
    except (RuntimeError, TypeError):
        return False


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding, rotate-half form (Su et al. 2021, "RoFormer", eq. 34)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
