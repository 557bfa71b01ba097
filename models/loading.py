"""Load a causal LM as an `ActorCritic`: NF4 (bitsandbytes) or full-precision base, LoRA adapters (peft)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from models.actor_critic import CRITIC, POLICY, SETTINGS_FILE, ActorCritic


class ModelLoadError(RuntimeError):
    """The model or its tokenizer could not be found or loaded."""


def _looks_like_path(name: str) -> bool:
    """A hub id is "org/name"; anything absolute, relative-dotted or deeper is meant as a local folder."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or Path(name).exists()


def _load_error(name: str, exc: Exception) -> ModelLoadError:
    if _looks_like_path(name):
        folder = Path(name).expanduser()
        if not folder.exists():
            return ModelLoadError(f"No model folder at {folder}: check the path.")
        return ModelLoadError(f"Could not load the model in {folder}: {str(exc).splitlines()[0]}")
    return ModelLoadError(
        f"Could not load {name!r}: it is not a local folder and could not be fetched from the Hugging Face "
        "Hub (wrong name, or no network: download it first and pass its folder)."
    )


def _device_and_dtype(device: str | None, dtype: torch.dtype | None) -> tuple[str, torch.dtype]:
    """Default to CUDA with bf16 when available, else the CPU in fp32 (bf16 matmuls are slow there)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype is None:
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    return device, dtype


def cpu_has_bf16() -> bool:
    """Whether this CPU has bf16 matmul units (AVX-512 bf16 or AMX); without them bf16 is emulated and slower."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _load_base(
    path: str, quantization: str, device: str, dtype: torch.dtype, compute_dtype: torch.dtype | None = None
) -> torch.nn.Module:
    """Load the base causal LM, 4-bit NF4 with double quantization (computing in `compute_dtype`, `dtype` when
    None) or in `dtype`."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if quantization == "nf4":
        qconfig = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype or dtype,
        )
        model = AutoModelForCausalLM.from_pretrained(
            path, quantization_config=qconfig, dtype=dtype, device_map={"": device}
        )
        _keep_cpu_4bit_differentiable(model)
        return model
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)


def _keep_cpu_4bit_differentiable(model: torch.nn.Module) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference.

    On a CPU with AVX512-BF16, the first eval-mode no-grad forward of a Linear4bit permanently converts
    its weight to a packed layout served by `gemv_4bit`, which has no autograd: every later training
    pass would silently drop the gradient through the base layers (bitsandbytes 0.50, nn/modules.py).
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def _add_lora(
    model: torch.nn.Module, *, quantized: bool, gradient_checkpointing: bool, critic: str, **lora: Any
) -> torch.nn.Module:
    """Wrap `model` in a PeftModel with a "policy" adapter (and a "critic" one when separate)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    # Non-reentrant checkpointing needs no input-grad hook and works with frozen embeddings.
    gc_kwargs = {"use_reentrant": False}
    if quantized:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gradient_checkpointing, gradient_checkpointing_kwargs=gc_kwargs
        )
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
    # "all-linear" makes peft skip the output layer, so lm_head (tied to the embeddings) stays frozen.
    config = LoraConfig(task_type="CAUSAL_LM", bias="none", **lora)
    peft_model = get_peft_model(model, config, adapter_name=POLICY)
    if critic == "separate":
        peft_model.add_adapter(CRITIC, config)
    return peft_model


def load_actor_critic(
    name_or_path: str,
    *,
    quantization: str = "nf4",
    lora_r: int = 16,
    lora_alpha: int = 32,
    lora_dropout: float = 0.0,
    target_modules: str | list[str] = "all-linear",
    critic: str = "separate",
    gradient_checkpointing: bool = True,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    compute_dtype: torch.dtype | None = None,
    adapters: str | Path | None = None,
) -> ActorCritic:
    """Load `name_or_path` (a local folder or hub id) as one base shared by policy, critic and
    reference. `adapters` optionally names a folder written by `ActorCritic.save_pretrained` to load.

    `compute_dtype` (NF4 only; None: `dtype`): what the 4-bit base layers' matmuls run in. bitsandbytes casts
    each one's input to it and its output back, so with bf16 on an fp32 CPU model only those matmuls are bf16:
    the LoRA adapters, their sum with the base output, the residual stream, attention, log-probs and values
    stay fp32 (an adapter's small update is never rounded away in a bf16 sum, as under autocast)."""
    from transformers import AutoTokenizer

    if quantization not in ("nf4", "none"):
        raise ValueError(f'quantization must be "nf4" or "none", got {quantization!r}.')
    if critic not in ("separate", "shared"):
        raise ValueError(f'critic must be "separate" or "shared", got {critic!r}.')
    device, dtype = _device_and_dtype(device, dtype)
    path = str(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        base = _load_base(path, quantization, device, dtype, compute_dtype)
    except (OSError, ValueError) as exc:
        raise _load_error(path, exc) from exc
    # The rollout left-pads prompts for generation; pad must differ from eos so padding is never "the end".
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        raise ModelLoadError(f"The tokenizer of {path} has no pad token; set one distinct from eos.")
    lora = {
        "r": lora_r,
        "lora_alpha": lora_alpha,
        "lora_dropout": lora_dropout,
        "target_modules": target_modules,
    }
    model = _add_lora(
        base,
        quantized=quantization == "nf4",
        gradient_checkpointing=gradient_checkpointing,
        critic=critic,
        **lora,
    )
    # Keys match this function's arguments, so `load_checkpoint` can pass them back.
    settings = {
        "name_or_path": name_or_path,
        "quantization": quantization,
        "lora_r": lora_r,
        "lora_alpha": lora_alpha,
        "lora_dropout": lora_dropout,
        "target_modules": target_modules,
        "critic": critic,
    }
    ac = ActorCritic(model, tokenizer, critic=critic, settings=settings)
    if adapters is not None:
        ac.load_adapters(adapters)
    return ac


def saved_settings(directory: str | Path) -> dict[str, Any] | None:
    """The loading settings (base, quantization, LoRA shape) `ActorCritic.save_pretrained` wrote in `directory`;
    None when it holds none."""
    path = Path(directory) / SETTINGS_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def load_checkpoint(directory: str | Path, **overrides: Any) -> ActorCritic:
    """Rebuild the ActorCritic saved in `directory` by `ActorCritic.save_pretrained`.

    `overrides` replace saved settings or add loading options (e.g. `device`, or `name_or_path` when the
    base model moved).
    """
    saved = saved_settings(directory)
    if saved is None:
        raise ModelLoadError(
            f"No {SETTINGS_FILE} in {directory}: it is not a checkpoint written by save_pretrained."
        )
    settings = {**saved, **overrides}
    return load_actor_critic(settings.pop("name_or_path"), adapters=directory, **settings)
