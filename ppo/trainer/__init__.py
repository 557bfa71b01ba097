"""The trainer: ``loop`` (the run and its iterations), ``update`` (scoring, advantages, PPO epochs) and ``state``
(the run state saved and restored as one)."""
