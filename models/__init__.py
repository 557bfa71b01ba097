"""Any causal LM as one actor-critic: NF4 base + LoRA adapters (policy, critic), value head, reference.

Imports nothing else of this project: which model to load (presets, the tiny recipe) is decided above it.
"""

from models.actor_critic import ActorCritic
from models.loading import ModelLoadError, load_actor_critic, load_checkpoint

__all__ = ["ActorCritic", "ModelLoadError", "load_actor_critic", "load_checkpoint"]
