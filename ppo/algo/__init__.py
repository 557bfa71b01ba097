"""The PPO math (``core``): masked statistics, GAE and other advantage pieces, the losses, KL estimators and
controllers. Tensors in, tensors out; imports torch only."""
