"""The training library: what every caller that trains, evaluates or times a model imports.

    state           train state: init (sharded), abstract state, eval variables, unbox, and
                    reading a workdir back as (config, model, variables)
    step            the one train step and eval step (jitted per patch size by the caller)
    optim           the one optimizer / learning-rate schedule factory
    losses          per-example classification losses and the distillation KL
    patch_schedule  FlexiViT's per-step random patch size, a pure function of (seed, step)
    sharding        device mesh, logical-axis rules, parameter and batch shardings, global batches
    distributed     multi-host initialisation and process roles
    cache           JAX's persistent compilation cache
    checkpoint      the one orbax checkpoint API (async saves, restore onto any mesh)
    mixup           mixup inside the jitted step (pure JAX)
    evaluation      classification evals over TFDS splits (imports the input pipeline, so it is
                    not imported here: ``import flexvision.engine`` pulls in no TensorFlow)

Layering (docs/engine.md): layers <- models <- detection <- engine <- {train, benchmark,
evaluate, experiments, configs, tests}. The engine never imports the training application
(``flexvision.train``) nor calls back into it.
"""

from flexvision.engine import (cache, checkpoint, distributed, losses, mixup, optim,
                               patch_schedule, sharding, state, step)

__all__ = ["cache", "checkpoint", "distributed", "losses", "mixup", "optim", "patch_schedule",
           "sharding", "state", "step"]
