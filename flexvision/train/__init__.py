"""Training: trainer loop, steps, patch-size schedule, distillation, sharding, checkpoints, evals."""
