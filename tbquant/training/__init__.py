"""Machinery of the distillation loop: the accelerate runtime, checkpoints and numerical faults."""
