"""The training application: the loop (trainer.py), task objectives (objective.py,
distillation in distill.py), metric logging (metrics.py) and the entry point
``python -m flexvision.train``. Its machinery (state, step, optimizer, losses, schedule,
sharding, checkpoints, evals) is the library ``flexvision.engine``; nothing outside this package
imports it."""
