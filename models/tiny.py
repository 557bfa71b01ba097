"""The `tiny` preset: a randomly initialised Qwen3-shaped model plus a locally trained tokenizer.

It is built on the CPU with no network, saved like any Hugging Face checkpoint, and then loaded through
the same `from_pretrained` path as Qwen3-1.7B, so CPU tests exercise the real loading code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

TINY_CONFIG: dict[str, Any] = {
    "hidden_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "intermediate_size": 768,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": True,
    "rope_theta": 10000.0,
}
# What a base built with the copying circuit changes: Qwen3's own RoPE base, which leaves the circuit's content
# match (``wire_copying``) 12 frequency pairs that turn by less than 0.4 rad over 2,048 positions (at 10,000 only
# 4 would).
COPY_CIRCUIT_CONFIG: dict[str, Any] = {"rope_theta": 1_000_000.0}

# The copying circuit's magnitudes (``wire_copying``): the sharpness of the previous-token and induction heads
# (their QK-norm weights), the gains of their outputs, and the final norm's weight, which sets how confident
# the copy is at initialisation (about 5 nats ahead of the next token).
COPY_CIRCUIT = {
    "prev_sharpness": 3.0,
    "match_sharpness": 2.5,
    "prev_gain": 0.5,
    "copy_gain": 2.0,
    "third_weight": 0.5,
    "final": 0.08,
    "escape_flag": 4.0,
    "start_flag": 4.0,
}

# Characters a JSON string spells with an escape. A prompt cuts a CSV's rows with a newline; the call that copies
# them writes backslash and n, another token, after which the circuit found nothing to match (``escape_pairs``).
JSON_ESCAPES = {"\n": "\\n"}


def _rope_base(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def word_tokens(tokenizer) -> list[bool]:
    """Which ids spell letters only (a leading space allowed): the pieces of names, which the copying circuit
    copies. Digits, punctuation and markup are left to what training learns."""
    words = []
    for i in range(len(tokenizer)):
        text = tokenizer.decode([i])
        words.append(text.lstrip(" ").isalpha())  # "" and whitespace are not alphabetic
    return words


def copy_tokens(tokenizer) -> list[bool]:
    """Which ids the copying circuit copies: word pieces (``word_tokens``), digits and the lone space, the pieces
    of names and of numbers and the space between a name's words (the tokenizer keeps it out of capitalised words,
    so whether a name goes on after one of them is copied too). Punctuation and markup, the separators between
    them, are left to what training learns."""
    copied = []
    for i, word in enumerate(word_tokens(tokenizer)):
        text = tokenizer.decode([i])
        copied.append(word or text.lstrip(" ").isdigit() or text == " ")
    return copied


def name_starts(tokenizer) -> list[bool]:
    """Which ids begin a capitalised word: the first pieces of names (``Pen`` of Penrith), which the copying circuit
    cannot find by the tokens before them when the call writes a name where the prompt did not (``query": "`` against
    ``about the``). ``wire_copying`` flags them in one direction that learned attention can look for."""
    return [
        word and tokenizer.decode([i]).lstrip(" ")[:1].isupper()
        for i, word in enumerate(word_tokens(tokenizer))
    ]


def escape_pairs(tokenizer) -> list[tuple[int, int]]:
    """(id of a character, id of its JSON escape) for each of ``JSON_ESCAPES`` that the tokenizer spells as one token
    both ways: the copying circuit matches the two as one token (``wire_copying``)."""
    pairs = []
    for char, escape in JSON_ESCAPES.items():
        plain, escaped = (tokenizer.encode(text, add_special_tokens=False) for text in (char, escape))
        if len(plain) == 1 and len(escaped) == 1:
            pairs.append((plain[0], escaped[0]))
    return pairs


def wire_copying(
    model,
    seed: int = 0,
    copyable: list[bool] | None = None,
    escapes: list[tuple[int, int]] = (),
    starts: list[bool] | None = None,
) -> None:
    """Set a random Qwen3 model's weights so that, before any training, it copies names and numbers: a piece seen
    before is written again after the three tokens that preceded it then (an induction circuit, Olsson et al. 2022,
    "In-context Learning and Induction Heads"), built by hand instead of waiting for training to find it.

    Imitation has to copy names and lists from the prompt into the calls, and a randomly initialised model learns
    that late: it writes the names it memorized instead. A pretrained base, which the tiny model stands in for, has
    such heads. The circuit, in the residual stream's dimensions (h = head_dim, d = hidden_size):

    - embeddings: dims [0, h) hold a random code of every token, dims [h, 2h) and [3h, d - 1) are zero, dims
      [2h, 3h) hold a second random code of the ``copyable`` tokens only (default: all), and the last dim is a
      constant 1 (a direction every position has). Each pair of ``escapes`` (a character and its JSON escape,
      ``escape_pairs``) shares the first code, so the circuit matches the escape where the prompt had the
      character, and the escape alone has dim d - 2 set (at ``escape_flag``), which no head of the circuit reads
      and the rest of the model tells them apart by. The ``starts`` (``name_starts``) have dim d - 3 set (at
      ``start_flag``), read by no head of the circuit either: one direction that says "a name begins here";
    - layer 0, query heads 0, 1 and 2 (both key/value heads, set alike): previous-token heads. Their queries and
      keys read only the constant dim, so after QK-norm they are fixed vectors, and each query is the key turned
      back by one (head 0), two (head 1) or three (head 2) positions of RoPE (Su et al. 2021), so head 0's score
      is sum_j a_j^2 cos(theta_j (s - t + 1)): highest at s = t - 1 (head 1: s = t - 2, head 2: s = t - 3).
      Amplitudes a_j^2 = theta_j keep every other offset of 2,048 at least 0.17 of the peak below it. Their value
      is the first code: head 0 writes the code of t - 1 to dims [h, 2h), heads 1 and 2 those of t - 2 and t - 3,
      each through one random orthonormal map R, to the two halves w = (d - 3 - 3h) // 2 wide of [3h, d - 3).
      Query head 3, which reads the same keys and values, is silenced (its output weights zero);
    - layer 1, query head 2 (key/value head 1): the induction head. Its query reads the codes of t, t - 1 and
      t - 2, its key those of s - 1, s - 2 and s - 3, each pair through one random orthonormal projection onto
      the 12 slowest RoPE pairs (nearly still over the context; those of the older two lie in R's rows, so reading
      them back through R is exact), so it attends where the three tokens before s are the last three at t, and
      less where fewer of them are (weights 1, 1/2 and 1/4 from the newest: the codes before t came at half
      gain, and the oldest is read at ``third_weight``). Its value is the second code at s, added to dims
      [2h, 3h) at t: the tied unembedding reads it back as the logit of the token at s if that token is copyable,
      and of no token otherwise;
    - every other weight keeps its random initialisation (the final norm's weight, which scales how sure the copy
      is, excepted). Zeroing the other heads' and the MLPs' outputs as well, so that only the circuit acted at
      first, left imitation unable to copy lists of numbers (greedy val data tasks 0.04 after the warm start).

    Why two tokens: in a list such as ``[8, 4, 10]`` the tiny tokenizer writes each digit and each ``, `` as a token
    of its own, so the token before every element is the same ``, `` and a one-token match cannot tell which
    element comes next; the two tokens before it can. Matched on one token with only word pieces copyable (the
    previous circuit), the wired base copied 4% of the copyable tokens of the val tasks' first calls (the data
    tasks; teacher-forced argmax, untrained), 28% with digits copyable as well, and 61% matched on two. Copying
    every token, markup included, made lists and records loop (``39, 39, 39``, ``DeeDeeDee``: once a token follows
    itself, the head matches its own position and copies it again), so separators and markup are not copyable
    (``copy_tokens``).

    Why three: in a list of numbers of two digits, ``52, 35, 34``, the same two tokens ``, `` ``3`` come before the
    ``5`` of 35 and the ``4`` of 34, so a two-token match copied one of them twice (``35, 35``) or skipped one; the
    token before the separator tells them apart. Teacher-forced on the same first calls, untrained, three wiring
    seeds each, at the match sharpness 2.5: the data tasks' copyable tokens 0.59-0.62 matched on two, 0.70 on
    three; all categories 0.48-0.53 and 0.51-0.55 (at 2.0, where the two-token circuit was set, the third term's
    noise left a list's elements copied at 0.61 in ``tests/test_models.py``).

    Why escapes: a prompt cuts a CSV's rows with newlines, and the call that copies it into a JSON string writes
    each as backslash-n, a token of its own, so the newest of the three tokens before a row's name never matched
    the prompt, while the call's own earlier rows matched it (``Ida,56\\nIda,56``). Teacher-forced on the same
    first calls, untrained, three wiring seeds (``python -m ppo.tiny.probe``): the multi-step tasks' copyable tokens
    0.36-0.50 without the pair, 0.51-0.68 with it; data 0.69-0.70 and 0.72-0.75; all categories 0.51-0.56 and
    0.54-0.61. The first row of a CSV is still not found: the tokenizer merges ``text": "name,score\\n`` into one
    token, which nothing in the prompt matches.

    Why name starts: the circuit finds a piece by the tokens before it, so the first piece of a value that the call
    writes after other tokens than the prompt did (``"query": "Penrith`` against ``about the Penrith``) is left to
    learned attention, which had no direction that says where names begin. With the flag, after the warm start and
    5 PPO iterations (greedy val, PPO seed 0), four warm starts on two CPUs gained 0.009-0.055 over the circuit
    without it; the same build with the flag at 0 (the codes 30 dims wide instead of 31) did not (README, "Copying
    names and numbers").
    """
    import torch

    cfg = model.config
    d, hd = cfg.hidden_size, cfg.head_dim
    half, low = hd // 2, 12
    width = (d - 3 - 3 * hd) // 2  # the dims of each of the codes of t - 2 and t - 3 (d - 3 to d - 1 kept)
    if width < 2 * low or cfg.num_attention_heads < 3 or cfg.num_key_value_heads < 2:
        raise ValueError(
            f"the copying circuit needs hidden_size >= 3 * head_dim + {4 * low + 3}, 3 query and 2 key/value "
            f"heads; this model has {d}, {cfg.num_attention_heads} and {cfg.num_key_value_heads} (head_dim {hd})"
        )
    if cfg.num_hidden_layers < 2 or cfg.num_attention_heads // cfg.num_key_value_heads != 2 or half < low:
        raise ValueError(
            "the copying circuit needs 2+ layers, 2 query heads per key/value head, head_dim >= 24"
        )
    k = COPY_CIRCUIT
    code, prev, out = slice(0, hd), slice(hd, 2 * hd), slice(2 * hd, 3 * hd)
    start_dim, escape_dim, const = d - 3, d - 2, d - 1
    prev2, prev3 = slice(3 * hd, 3 * hd + width), slice(3 * hd + width, 3 * hd + 2 * width)
    generator = torch.Generator().manual_seed(seed)
    inv_freq = _rope_base(cfg) ** (-torch.arange(half, dtype=torch.float64) * 2 / hd)
    layers = model.model.layers

    def orthonormal_rows(rows: int, cols: int) -> torch.Tensor:
        return torch.linalg.qr(torch.randn(cols, cols, generator=generator))[0][:rows]

    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        vocab = emb.shape[0]
        emb[:, code] = torch.randn(vocab, hd, generator=generator)
        emb[:, prev] = 0.0
        emb[:, 3 * hd : d - 1] = 0.0  # where the codes of t - 2 and t - 3 go, and the flags
        if starts is not None:
            emb[torch.tensor(starts), start_dim] = k["start_flag"]
        for plain, escaped in escapes:
            emb[escaped, code] = emb[plain, code]
            emb[escaped, escape_dim] = k["escape_flag"]
        mask = torch.ones(vocab) if copyable is None else torch.tensor(copyable, dtype=torch.float32)
        emb[:, out] = torch.randn(vocab, hd, generator=generator) * mask[:, None]
        emb[:, const] = 1.0
        # Layer 0: the previous-token heads. HF's RoPE pairs dim j with j + half, turned by theta_j a position.
        att = layers[0].self_attn
        amp = inv_freq.sqrt()
        key = torch.zeros(hd, dtype=torch.float64)
        key[:half] = amp
        # Both key/value heads hold the constant key and the code value: query heads 0-1 read the first, 2 the second.
        att.k_proj.weight[: 2 * hd] = 0.0
        att.k_proj.weight[: 2 * hd, const] = key.float().repeat(2)
        rotate = orthonormal_rows(width, hd)  # R: the codes of t - 2 and t - 3, in the dims left
        att.o_proj.weight[:, : 4 * hd] = 0.0  # query head 3 reads the codes too, at random: silenced
        heads = ((1, prev, torch.eye(hd)), (2, prev2, rotate), (3, prev3, rotate))
        for head, (back, rows, gain) in enumerate(heads):
            query = torch.zeros(hd, dtype=torch.float64)
            query[:half], query[half:] = amp * torch.cos(back * inv_freq), -amp * torch.sin(back * inv_freq)
            q_rows = slice(head * hd, (head + 1) * hd)
            att.q_proj.weight[q_rows] = 0.0
            att.q_proj.weight[q_rows, const] = query.float()
            att.o_proj.weight[rows, q_rows] = k["prev_gain"] * gain
        att.q_norm.weight.fill_(k["prev_sharpness"])
        att.k_norm.weight.fill_(k["prev_sharpness"])
        att.v_proj.weight[: 2 * hd] = 0.0
        att.v_proj.weight[: 2 * hd, code] = torch.eye(hd).repeat(2, 1)
        # Layer 1: the induction head (query head 2 reads key/value head 1 under grouped-query attention).
        att = layers[1].self_attn
        slow = torch.cat([torch.arange(half - low, half), torch.arange(hd - low, hd)])
        # The projections of the codes of t - 1 and t - 2 lie in R's rows, so that reading them back through R is
        # exact: (M R) R^T (R c) = M R c.
        now = orthonormal_rows(2 * low, hd)
        before = orthonormal_rows(2 * low, width) @ rotate
        third = orthonormal_rows(2 * low, width) @ rotate
        q_rows, kv_rows = slice(2 * hd, 3 * hd), slice(hd, 2 * hd)
        att.q_proj.weight[q_rows] = 0.0
        att.k_proj.weight[kv_rows] = 0.0
        att.v_proj.weight[kv_rows] = 0.0
        att.q_proj.weight[2 * hd + slow, code] = now  # the token at t ...
        att.k_proj.weight[hd + slow, prev] = now  # ... against the one at s - 1
        att.q_proj.weight[2 * hd + slow, prev] = before  # the token at t - 1 ...
        att.k_proj.weight[hd + slow, prev2] = before @ rotate.T  # ... against the one at s - 2
        att.q_proj.weight[2 * hd + slow, prev2] = k["third_weight"] * third @ rotate.T  # the one at t - 2 ...
        att.k_proj.weight[hd + slow, prev3] = third @ rotate.T  # ... against the one at s - 3
        att.q_norm.weight.fill_(k["match_sharpness"])
        att.k_norm.weight.fill_(k["match_sharpness"])
        att.v_proj.weight[kv_rows, out] = torch.eye(hd)
        att.o_proj.weight[:, q_rows] = 0.0
        att.o_proj.weight[out, q_rows] = k["copy_gain"] * torch.eye(hd)
        model.model.norm.weight.fill_(k["final"])


def _save_model(
    out_dir: Path, tokenizer, seed: int, overrides: dict[str, Any], copy_circuit: bool = False
) -> None:
    """Create the random-init Qwen3ForCausalLM sized to the tokenizer (with ``copy_circuit``, wired to copy:
    ``wire_copying``) and save it to `out_dir`."""
    import torch
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    pad_id = tokenizer.pad_token_id
    eos_id = tokenizer.eos_token_id
    settings = {**TINY_CONFIG, **(COPY_CIRCUIT_CONFIG if copy_circuit else {}), **overrides}
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        bos_token_id=pad_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        **settings,
    )
    # The generator is seeded locally so building never disturbs the caller's global RNG stream.
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config).float().eval()
        if copy_circuit:
            wire_copying(model, seed, copy_tokens(tokenizer), escape_pairs(tokenizer), name_starts(tokenizer))
    finally:
        torch.random.set_rng_state(state)
    model.generation_config = GenerationConfig(eos_token_id=[eos_id, pad_id], pad_token_id=pad_id)
    model.save_pretrained(out_dir)


def build_tiny(
    out_dir: str | Path,
    texts: list[str],
    seed: int = 0,
    *,
    vocab_size: int = 4096,
    copy_circuit: bool = False,
    **config_overrides: Any,
) -> Path:
    """Build the tiny model, with a tokenizer trained on ``texts``, into `out_dir` (created). Returns `out_dir`.

    `config_overrides` replace entries of `TINY_CONFIG` (e.g. `hidden_size=128` for faster tests).
    `copy_circuit`: wire the random model to copy names (``wire_copying``, with `COPY_CIRCUIT_CONFIG`).
    Caching, and which texts, are the recipe's (``ppo.tiny``).
    """
    from models.tokenizer import train_tokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(texts, vocab_size=vocab_size)
    tokenizer.save_pretrained(out)
    _save_model(out, tokenizer, seed, config_overrides, copy_circuit)
    return out
