"""Byte-level BPE tokenizer of the tiny preset, trained locally on texts the caller gives.

The tokenizer mimics Qwen3's where it matters to the rest of the library: ByteLevel (any text encodes),
digits split one per token, ChatML special tokens, pad (`<|endoftext|>`) distinct from eos (`<|im_end|>`),
and a chat template that renders tools and tool calls the way Qwen3's does.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

TEMPLATE_PATH = Path(__file__).parent / "templates" / "tiny_chat.jinja"

# Special tokens hide on decode(skip_special_tokens=True); the tool and think markers must survive it,
# because the env parses the decoded text for them (Qwen3 registers them the same way).
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MARKUP_TOKENS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>"]
PAD_TOKEN = "<|endoftext|>"
EOS_TOKEN = "<|im_end|>"

# Pre-tokenization of the tiny preset: every digit is its own pre-token (as in Qwen's tokenizer, so numbers
# are spelled digit by digit and can be copied one digit at a time), lines and single quotes are cut apart,
# and so is every capitalised word, without the space before it. Names are capitalised words: cut apart, a product
# such as 'Black Trowel' is two words the train split has seen ('Black', 'Trowel') instead of one token that
# only a held-out name uses, and an unseen place name falls into smaller pieces (on the train-only corpus this
# halved the test tasks whose solution needs a token no train sequence holds: 36 -> 17 of 110). The space stays
# out of the word so that a name is the same ids wherever it stands: with it, 'Penrith' was ' Pen' 'rith' after a
# space in the prompt and 'P' 'en' 'rith' after the quote of a call, and the copying circuit (models.tiny) found
# nothing to copy (greedy val after PPO 0.600 -> 0.664 without it; README, "Copying names and numbers"). Unlike
# Qwen's word-level split, merges may span spaces and punctuation elsewhere: the tool block that every prompt
# carries then compresses from about 1,900 tokens to about 230, and a 2-core CPU spends its time on the policy's
# turns instead of re-reading the system prompt. (Measured on the mock server's 13 tools.)
TINY_SPLIT_PATTERN = r"\p{N}|\n|'|\p{Lu}\p{Ll}+"
# Merged tokens stay short enough that rare strings still decompose into known pieces.
MAX_TOKEN_LENGTH = 48


def chat_template() -> str:
    """Return the Jinja chat template of the tiny preset."""
    return TEMPLATE_PATH.read_text(encoding="utf-8")


def render_chat(messages: list[dict[str, Any]], tools: list[dict] | None = None, **kwargs: Any) -> str:
    """Render one conversation with the tiny chat template, without needing a trained tokenizer."""
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered = render_jinja_template([messages], tools=tools, chat_template=chat_template(), **kwargs)
    # Newer transformers return (texts, generation_indices); keep only the text of our one chat.
    texts = rendered[0] if isinstance(rendered, tuple) else rendered
    return texts[0] if isinstance(texts, list) else texts


def _raw_bpe(texts: Iterable[str], vocab_size: int):
    """Train a `tokenizers.Tokenizer` (byte-level BPE, Qwen-style split) on `texts`."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(TINY_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    special = [AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS]
    markup = [AddedToken(t, special=False, normalized=False) for t in MARKUP_TOKENS]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
        max_token_length=MAX_TOKEN_LENGTH,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_tokens(markup)
    return tok


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096):
    """Train the tiny preset's tokenizer on ``texts`` and wrap it as a transformers fast tokenizer.

    Which texts is the recipe's choice (``ppo.tiny.corpus``: the train tasks rendered through the chat template).
    """
    from transformers import PreTrainedTokenizerFast

    raw = _raw_bpe(list(texts), vocab_size)
    # Left padding: generation appends on the right, so every prompt must end at the same column.
    return PreTrainedTokenizerFast(
        tokenizer_object=raw,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        chat_template=chat_template(),
        padding_side="left",
        model_max_length=4096,
        clean_up_tokenization_spaces=False,
    )
