"""Rollouts: episodes on the env pool, sampled by the policy and laid out as token tensors.

- ``episodes``: the chat format at token level, ``Episode``/``RolloutBatch``, ``collect_rollouts``;
- ``engine``: the samplers behind one interface (``ENGINES``: ``static``, ``loop``), chosen by ``--engine``;
- ``generation``: the sampling primitives and the merged sampling copy of the policy.
"""

from ppo.rollout.episodes import ChatFormat, Episode, RolloutBatch, collect_rollouts, pad_episodes

__all__ = ["ChatFormat", "Episode", "RolloutBatch", "collect_rollouts", "pad_episodes"]
