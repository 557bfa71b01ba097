"""What a run stands on: ``config`` (Config, presets, command line), ``checkpoint`` (run folders, atomic writes,
fallback to the newest intact checkpoint), ``monitor`` (metrics.jsonl, TensorBoard, summaries), ``distributed``
(torchrun helpers) and ``setup`` (policy, optimizer, schedule and env pool built from a Config)."""
