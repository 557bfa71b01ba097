"""One base model, three roles: policy (LoRA "policy"), critic (LoRA "critic" + value head), reference.

Shapes: B rows, T token positions, H hidden size. All outputs follow the alignment contract of
`models.scoring`: position t describes token t, computed from the hidden state at t - 1.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.prefix import MIN_SHARED_PREFIX, hidden_with_shared_prefix, shared_prefix_length
from models.scoring import position_ids_from_mask, token_logprobs, token_values

POLICY = "policy"
CRITIC = "critic"
VALUE_HEAD_FILE = "value_head.safetensors"
SETTINGS_FILE = "qwen_tool_model.json"
ADAPTER_FILE = "adapter_model.safetensors"


class ActorCritic(nn.Module):
    """A PeftModel whose adapters play policy and critic, with disabled adapters as the reference.

    Attributes: `model` (the PeftModel), `value_head` (nn.Linear(H, 1), fp32), `tokenizer`, `config`
    (the base model's config), `settings` (what `load_actor_critic` needs to rebuild this object).
    With `critic="shared"` there is one adapter, "policy", and the value head reads its hidden states.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, *, critic: str, settings: dict[str, Any]) -> None:
        super().__init__()
        if critic not in ("separate", "shared"):
            raise ValueError(f'critic must be "separate" or "shared", got {critic!r}.')
        self.model = model
        self.tokenizer = tokenizer
        self.config = model.config
        self.critic_mode = critic
        self.settings = settings
        # Compute the prefix all rows share (the system turn with the tools) once per pass; see models.prefix.
        self.share_prefix = True
        # After the shared prefix, pack the rows' suffixes instead of padding them (same results; models.prefix).
        self.pack_suffixes = True
        device = model.get_input_embeddings().weight.device
        self.value_head = nn.Linear(self.config.hidden_size, 1, device=device, dtype=torch.float32)
        # Small weights: initial values near 0 (not swamping the first targets), yet a nonzero gradient
        # reaches the critic adapter from the first step (a zero head would block it).
        nn.init.normal_(self.value_head.weight, std=0.1 / self.config.hidden_size**0.5)
        nn.init.zeros_(self.value_head.bias)
        # peft leaves an adapter added after the first one frozen; both are trained, so mark them all.
        self._trainable = [*self.policy_parameters(), *self.critic_parameters()]
        self._activate(POLICY)

    # ----- parameters -------------------------------------------------------------------------

    def _adapter_params(self, name: str) -> list[nn.Parameter]:
        return [p for n, p in self.model.named_parameters() if f".{name}." in n and "lora_" in n]

    def policy_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters of the policy: its LoRA adapter."""
        return self._adapter_params(POLICY)

    def critic_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters of the critic: its LoRA adapter (when separate) and the value head."""
        lora = self._adapter_params(CRITIC) if self.critic_mode == "separate" else []
        return [*lora, *self.value_head.parameters()]

    # ----- roles ------------------------------------------------------------------------------

    def _activate(self, name: str) -> None:
        """Make adapter `name` the active one without changing which parameters are trainable.

        peft's set_adapter turns requires_grad off on inactive adapters; both adapters are trained by
        one optimizer, so the trainable set recorded at construction is restored right after.
        """
        self.model.base_model.set_adapter(name)
        self._restore_trainable()

    def _restore_trainable(self) -> None:
        for p in self._trainable:
            p.requires_grad_(True)

    @contextlib.contextmanager
    def _role(self, name: str) -> Iterator[ActorCritic]:
        previous = self.model.active_adapter
        self._activate(name)
        try:
            yield self
        finally:
            self._activate(previous)

    def policy(self) -> contextlib.AbstractContextManager[ActorCritic]:
        """Context in which the policy adapter is active (e.g. around `self.model.generate`)."""
        return self._role(POLICY)

    def critic(self) -> contextlib.AbstractContextManager[ActorCritic]:
        """Context in which the critic adapter is active (the policy one when the critic is shared)."""
        return self._role(CRITIC if self.critic_mode == "separate" else POLICY)

    @contextlib.contextmanager
    def reference(self) -> Iterator[ActorCritic]:
        """Context in which all adapters are disabled: the frozen base, exact because LoRA B starts at 0."""
        # peft flips requires_grad off when disabling adapters and on re-enabling only the active one.
        try:
            with self.model.disable_adapter():
                self._restore_trainable()
                yield self
        finally:
            self._restore_trainable()

    # ----- forward passes ---------------------------------------------------------------------

    def _hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Final (B, T, H) hidden states of the active role, zeroed on padding."""
        if input_ids.dim() != 2 or input_ids.shape != attention_mask.shape:
            raise ValueError(
                f"input_ids and attention_mask must both be (B, T), got {tuple(input_ids.shape)} "
                f"and {tuple(attention_mask.shape)}."
            )
        decoder = self.model.get_base_model().model
        prefix_len = self._prefix_to_share(input_ids, attention_mask)
        if prefix_len:
            hidden = hidden_with_shared_prefix(
                decoder, input_ids, attention_mask, prefix_len, pack=self.pack_suffixes
            )
        else:
            out = decoder(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids_from_mask(attention_mask),
                use_cache=False,
            )
            hidden = out.last_hidden_state  # (B, T, H)
        # Padded rows can hold NaN (a query with no visible key); zero them so 0 * NaN never reaches grads.
        return torch.where(attention_mask.bool().unsqueeze(-1), hidden, 0.0)

    def _prefix_to_share(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> int:
        """How many leading tokens to compute once for all rows (0: a plain batched pass).

        Never under activation checkpointing, for scoring either: rollout scoring and the update must take
        the same path, so that the PPO ratio is exactly 1 before the first update.
        """
        if not self.share_prefix or input_ids.shape[0] < 2 or self._checkpointing():
            return 0
        length = shared_prefix_length(input_ids, attention_mask)
        return length if length >= MIN_SHARED_PREFIX else 0

    def _checkpointing(self) -> bool:
        base = self.model.get_base_model()
        flag = getattr(base, "is_activation_checkpointing", None)
        if flag is None:
            flag = getattr(base, "is_gradient_checkpointing", False)
        return bool(flag() if callable(flag) else flag)

    def _logprobs(
        self, hidden: torch.Tensor, input_ids, attention_mask, **kw: Any
    ) -> dict[str, torch.Tensor]:
        lm_head = self.model.get_base_model().get_output_embeddings()
        return token_logprobs(hidden, input_ids, attention_mask, lm_head, **kw)

    def score(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        *,
        temperature: float = 1.0,
        role: str = "policy",
        with_entropy: bool = False,
        chunk_size: int = 512,
    ) -> dict[str, torch.Tensor]:
        """Rollout-time scoring, no gradients: {"logprobs": (B, T)} and optionally "entropy": (B, T).

        logprobs[:, t] = log p(input_ids[:, t] | input_ids[:, :t]) with logits / temperature; 0 at t=0
        and wherever the token or its predecessor is padding. role is "policy" or "reference".
        """
        roles = {"policy": self.policy, "reference": self.reference}
        if role not in roles:
            raise ValueError(f'role must be "policy" or "reference", got {role!r}.')
        with torch.no_grad(), roles[role]():
            hidden = self._hidden(input_ids, attention_mask)
            return self._logprobs(
                hidden,
                input_ids,
                attention_mask,
                temperature=temperature,
                with_entropy=with_entropy,
                chunk_size=chunk_size,
            )

    def values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Rollout-time critic, no gradients: (B, T) with values[:, t] = V(state before token t)."""
        with torch.no_grad(), self.critic():
            return token_values(self._hidden(input_ids, attention_mask), attention_mask, self.value_head)

    def forward_train(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        *,
        temperature: float = 1.0,
        chunk_size: int = 512,
    ) -> dict[str, torch.Tensor]:
        """PPO-update pass with gradients: {"logprobs", "entropy", "values"}, each (B, T).

        Separate critic: two passes (policy adapter, then critic adapter). Shared critic: one pass, and
        the value loss also reaches the policy adapter through the shared hidden states.
        """
        with self.policy():
            hidden = self._hidden(input_ids, attention_mask)
            out = self._logprobs(
                hidden,
                input_ids,
                attention_mask,
                temperature=temperature,
                with_entropy=True,
                chunk_size=chunk_size,
            )
        if self.critic_mode == "separate":
            with self.critic():
                hidden = self._hidden(input_ids, attention_mask)
        out["values"] = token_values(hidden, attention_mask, self.value_head)
        return out

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kw: Any
    ) -> dict[str, torch.Tensor]:
        """Same as `forward_train`, so the module can be called directly."""
        return self.forward_train(input_ids, attention_mask, **kw)

    # ----- persistence ------------------------------------------------------------------------

    def _adapter_names(self) -> list[str]:
        return [POLICY, CRITIC] if self.critic_mode == "separate" else [POLICY]

    def save_pretrained(self, directory: str | Path) -> Path:
        """Save the policy adapter at the root of `directory` (a PEFT folder), the critic adapter in
        `directory/critic/`, the value head and the settings needed to rebuild. Returns the folder."""
        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file

        root = Path(directory)
        for name in self._adapter_names():
            folder = root if name == POLICY else root / CRITIC
            folder.mkdir(parents=True, exist_ok=True)
            state = get_peft_model_state_dict(self.model, adapter_name=name)
            save_file(
                {k: v.detach().contiguous().cpu() for k, v in state.items()}, str(folder / ADAPTER_FILE)
            )
            self.model.peft_config[name].save_pretrained(str(folder))
        head = {k: v.detach().cpu() for k, v in self.value_head.state_dict().items()}
        save_file(head, str(root / VALUE_HEAD_FILE))
        (root / SETTINGS_FILE).write_text(json.dumps(self.settings, indent=2) + "\n", encoding="utf-8")
        return root

    def load_adapters(self, directory: str | Path) -> None:
        """Load adapters and value head written by `save_pretrained` into this object (exactly)."""
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        root = Path(directory)
        for name in self._adapter_names():
            path = (root if name == POLICY else root / CRITIC) / ADAPTER_FILE
            if not path.is_file():
                raise FileNotFoundError(f"No {name} adapter at {path}: is {root} a checkpoint of this model?")
            result = set_peft_model_state_dict(self.model, load_file(str(path)), adapter_name=name)
            missing = [k for k in result.missing_keys if f".{name}." in k and "lora_" in k]
            if result.unexpected_keys or missing:
                raise ValueError(f"The {name} adapter in {path} does not match this model's LoRA layout.")
        self.value_head.load_state_dict(load_file(str(root / VALUE_HEAD_FILE)))
