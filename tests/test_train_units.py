"""Units of the trainer: patch-size schedule, lr schedule, optimizer, losses, mixup."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from flexvision.engine.mixup import mixup
from flexvision.engine import losses, optim
from flexvision.engine import patch_schedule as flexi


def _flexi(**kw):
    return ml_collections.ConfigDict({"patch_sizes": (8, 16, 32), "probs": "uniform", **kw})


def test_patch_size_draw_is_a_pure_function_of_seed_and_step():
    draws = [flexi.patch_size_for_step(_flexi(), 0, s) for s in range(3000)]
    assert draws == [flexi.patch_size_for_step(_flexi(), 0, s) for s in range(3000)]
    assert draws != [flexi.patch_size_for_step(_flexi(), 1, s) for s in range(3000)]
    counts = np.array([draws.count(p) for p in (8, 16, 32)]) / 3000
    np.testing.assert_allclose(counts, 1 / 3, atol=0.04)
    weighted = [flexi.patch_size_for_step(_flexi(probs=[0, 1, 3]), 0, s) for s in range(2000)]
    assert 8 not in weighted and 0.7 < weighted.count(32) / 2000 < 0.8


@pytest.mark.parametrize("probs", [[1, 2], [-1, 1, 1], "zipf"])
def test_bad_patch_size_distribution(probs):
    with pytest.raises((ValueError, TypeError)):
        flexi.patch_size_distribution(_flexi(probs=probs))


def _config(**kw):
    config = ml_collections.ConfigDict({
        "lr": 0.1, "total_steps": 100,
        "schedule": {"warmup_steps": 10, "decay_type": "cosine", "min_lr_ratio": 0.0},
        "optax": {"name": "adam", "kwargs": {}, "weight_decay": 0.0, "grad_clip_norm": None}})
    config.update_from_flattened_dict(kw)
    return config


def test_warmup_then_cosine():
    schedule = optim.make_schedule(_config())
    assert float(schedule(0)) == 0.0
    assert float(schedule(5)) == pytest.approx(0.05)
    assert float(schedule(10)) == pytest.approx(0.1)
    assert float(schedule(55)) == pytest.approx(0.05, abs=1e-6)
    assert float(schedule(100)) == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="decay_type"):
        optim.make_schedule(_config(**{"schedule.decay_type": "step"}))


def test_decoupled_weight_decay_only_on_kernels_and_clipping():
    config = _config(**{"optax.weight_decay": 0.5, "optax.grad_clip_norm": 1.0,
                        "schedule.warmup_steps": 0, "optax.name": "sgd",
                        "optax.kwargs": {"momentum": 0.0}})
    tx, _ = optim.make_optimizer(config)
    params = {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))}
    grads = {"kernel": jnp.zeros((2, 2)), "bias": jnp.full((2,), 100.0)}
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(updates["kernel"], -0.1 * 0.5 * np.ones((2, 2)), rtol=1e-6)
    np.testing.assert_allclose(updates["bias"], -0.1 * np.full(2, 1 / np.sqrt(2)), rtol=1e-5)
    with pytest.raises(ValueError, match="config.optax.name"):
        optim.make_optimizer(_config(**{"optax.name": "adagrad9"}))


def test_label_smoothed_softmax_and_sigmoid_xent():
    logits = jnp.array([[2.0, 0.0, -1.0]])
    labels = jnp.array([[1.0, 0.0, 0.0]])
    log_p = jax.nn.log_softmax(logits)[0]
    smooth = losses.get_loss("softmax_xent", 0.3)(logits, labels)
    np.testing.assert_allclose(smooth, -(0.8 * log_p[0] + 0.1 * log_p[1] + 0.1 * log_p[2]),
                               rtol=1e-6)
    sig = losses.get_loss("sigmoid_xent")(logits, labels)
    expected = -(np.log(jax.nn.sigmoid(2.0)) + np.log(1 - jax.nn.sigmoid(0.0))
                 + np.log(1 - jax.nn.sigmoid(-1.0)))
    np.testing.assert_allclose(sig, [expected], rtol=1e-6)
    with pytest.raises(ValueError, match="unknown loss"):
        losses.get_loss("hinge")


def test_mixup_mixes_neighbours_and_keeps_label_mass():
    images = jnp.arange(4.0)[:, None, None, None] * jnp.ones((4, 2, 2, 1))
    labels = jax.nn.one_hot(jnp.arange(4), 4)
    mixed_images, mixed_labels = mixup(jax.random.key(0), images, labels, alpha=0.4)
    lam = float(mixed_labels[0, 0])
    assert 0.5 <= lam <= 1.0
    np.testing.assert_allclose(mixed_labels.sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(mixed_images[1, 0, 0, 0], lam * 1 + (1 - lam) * 0, rtol=1e-6)
    with pytest.raises(ValueError, match="alpha must be positive"):
        mixup(jax.random.key(0), images, labels, alpha=0.0)


@pytest.mark.parametrize("name, arg", [("flexivit_digits", None), ("vit_digits", None),
                                       ("flexivit_i1k", None), ("flexivit_i1k", "small,epochs=300"),
                                       ("vit_i1k", "base,patch=30"),
                                       ("distill_flexivit_i1k", "epochs=30"),
                                       ("distill_flexivit_digits", "/tmp/teacher")])
def test_configs_resolve(name, arg):
    import os

    import flexvision
    from flexvision.data import ops
    from flexvision.engine.configs import load_config_module

    module = load_config_module(os.path.join(os.path.dirname(os.path.dirname(__file__)),
                                             "configs", f"{name}.py"))
    config = module.get_config(arg)
    assert "python -m flexvision.train --config configs/" in module.__doc__
    ops.parse(config.input.pp)
    ops.parse(config.eval.pp)
    flexvision.create_model(config.model.name, **dict(config.model.kwargs))
    optim.make_optimizer(config)
    if config.flexi is not None:
        flexi.patch_size_distribution(config.flexi)
    assert config.input.batch_size % 8 == 0 and config.total_steps > 0


def test_train_step_targets_hook_replaces_the_labels():
    import flax.linen as nn
    import optax

    from flexvision.engine.step import make_train_step

    class Linear(nn.Module):
        @nn.compact
        def __call__(self, images, *, train=False):
            return nn.Dense(3)(images.reshape(images.shape[0], -1))

    model = Linear()
    images = jnp.ones((2, 2, 2, 1))
    params = model.init(jax.random.key(0), images)["params"]
    tx = optax.sgd(0.0)
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}
    batch = {"image": images, "labels": jax.nn.one_hot(jnp.array([0, 1]), 3)}
    teacher = jax.nn.one_hot(jnp.array([2, 2]), 3)
    loss = losses.get_loss("softmax_xent")
    step = make_train_step(model, tx, loss, seed=0, targets_fn=lambda frozen, x, y: frozen)
    _, metrics = jax.jit(step)(dict(state), batch, teacher)
    logits = model.apply({"params": params}, images)
    np.testing.assert_allclose(metrics["loss"], loss(logits, teacher).mean(), rtol=1e-6)
    assert bool(metrics["finite"])
