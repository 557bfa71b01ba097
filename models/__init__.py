"""Policy loading: NF4 base + LoRA adapters (policy, critic), value head, reference, the tiny preset."""

from models.actor_critic import ActorCritic
from models.loading import PRESET_MODELS, ModelLoadError, load_actor_critic, load_checkpoint, resolve_model

__all__ = [
    "PRESET_MODELS",
    "ActorCritic",
    "ModelLoadError",
    "load_actor_critic",
    "load_checkpoint",
    "resolve_model",
]
