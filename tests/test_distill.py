"""Distillation mode (flexvision/train/distill.py): the loss, the frozen teacher, student init."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.linen import meta

import flexvision
from flexvision.engine import losses
from flexvision.engine.step import make_train_step
from flexvision.train import distill


def numpy_distill_kl(student, teacher, temperature):
    """T^2 * sum_k p_t log(p_t / p_s), softmaxes at temperature T, in float64."""
    def softmax(z):
        z = z / temperature
        e = np.exp(z - z.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)
    p_t, p_s = softmax(teacher.astype(np.float64)), softmax(student.astype(np.float64))
    return temperature ** 2 * np.sum(p_t * (np.log(p_t) - np.log(p_s)), -1)


def test_kl_matches_numpy_reference():
    rng = np.random.default_rng(0)
    student, teacher = rng.normal(size=(2, 5, 7)).astype(np.float32) * 3
    for temperature in (1.0, 2.5):
        ours = np.asarray(losses.distillation_kl(student, teacher, temperature))
        ref = numpy_distill_kl(student, teacher, temperature)
        assert ours.shape == (5,)
        np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)
    assert np.allclose(losses.distillation_kl(teacher, teacher, 1.0), 0.0, atol=1e-6)


def test_mixed_loss_weights_kl_and_labels():
    rng = np.random.default_rng(1)
    student, teacher = rng.normal(size=(2, 4, 3)).astype(np.float32)
    labels = np.eye(3, dtype=np.float32)[[0, 2, 1, 1]]
    loss = losses.make_distill_loss(2.0, 0.25, lambda z, y: optax.softmax_cross_entropy(z, y))
    ours = np.asarray(loss(student, np.concatenate([teacher, labels], -1)))
    log_p = student - np.log(np.exp(student).sum(-1, keepdims=True))
    ref = 0.75 * numpy_distill_kl(student, teacher, 2.0) + 0.25 * -(labels * log_p).sum(-1)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)


def micro(name, **kwargs):
    return flexvision.create_model(name, num_classes=4, embed_dim=16, depth=1, num_heads=2,
                                   mlp_dim=32, **kwargs)


def test_teacher_receives_no_updates_and_student_learns():
    images = jax.random.normal(jax.random.key(0), (4, 16, 16, 3))
    labels = jax.nn.one_hot(jnp.arange(4) % 4, 4)
    teacher_model = micro("vit_micro", patch_size=(4, 4), posemb_grid=(4, 4))
    teacher_vars = meta.unbox(teacher_model.init(jax.random.key(1), images, train=False))
    teacher_before = jax.tree_util.tree_map(np.array, teacher_vars)
    teacher = distill.Teacher(teacher_model, teacher_vars, resolution=24)
    student = micro("flexivit_micro", patch_size=(8, 8), posemb_grid=(2, 2))
    params = meta.unbox(student.init(jax.random.key(2), images, train=False))["params"]
    tx = optax.adam(1e-2)
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}
    step = jax.jit(make_train_step(student, tx, losses.make_distill_loss(1.0), seed=0,
                                   patch_size=4, targets_fn=distill.make_teacher_targets(teacher)))
    history = []
    for _ in range(5):
        state, metrics = step(state, {"image": images, "labels": labels}, teacher.variables)
        history.append(float(metrics["loss"]))
    assert history[-1] < history[0]
    jax.tree_util.tree_map(np.testing.assert_array_equal, teacher_before,
                           jax.tree_util.tree_map(np.array, teacher.variables))
    assert "teacher" not in str(jax.tree_util.tree_structure(state["opt_state"]))
    # the teacher's logits are constants of the loss: the gradient through them is zero
    grad = jax.grad(lambda v: jnp.sum(distill.make_teacher_targets(teacher)(v, images, labels))
                    )(teacher_vars)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree_util.tree_leaves(grad))
    # the teacher is an input of the compiled step, not constants baked into it
    lowered = step.lower(state, {"image": images, "labels": labels}, teacher.variables)
    teacher_leaves = len(jax.tree_util.tree_leaves(teacher.variables))
    state_leaves = len(jax.tree_util.tree_leaves(state))
    assert lowered.in_tree.num_leaves == state_leaves + 2 + teacher_leaves


def test_student_from_teacher_with_other_patch_size_reproduces_teacher():
    images = jax.random.normal(jax.random.key(3), (2, 24, 24, 3))
    teacher_model = micro("vit_micro", patch_size=(4, 4), posemb_grid=(6, 6))
    teacher_vars = meta.unbox(teacher_model.init(jax.random.key(4), images, train=False))
    teacher = distill.Teacher(teacher_model, teacher_vars)
    for resize in ("timm", "big_vision"):
        student = micro("flexivit_micro", patch_size=(8, 8), posemb_grid=(6, 6), resize=resize)
        params = meta.unbox(student.init(jax.random.key(5), images, train=False))["params"]
        assert params["patch_embed"]["kernel"].shape[:2] == (8, 8)
        params = distill.init_student_from_teacher(student, params, teacher,
                                                   teacher_vars["params"], image_size=24)
        ours = student.apply({"params": params}, images, patch_size=4)
        ref = teacher_model.apply(teacher_vars, images)
        scale = max(1.0, float(jnp.abs(ref).max()))
        assert float(jnp.abs(ours - ref).max()) <= 1e-4 * scale


def test_student_posemb_resampled_from_larger_teacher_grid():
    images = jax.random.normal(jax.random.key(6), (2, 24, 24, 3))
    teacher_model = micro("vit_micro", patch_size=(4, 4), posemb_grid=(6, 6))
    teacher_vars = meta.unbox(teacher_model.init(jax.random.key(7), images, train=False))
    teacher = distill.Teacher(teacher_model, teacher_vars)
    student = micro("flexivit_micro", patch_size=(8, 8), posemb_grid=(3, 3))
    params = meta.unbox(student.init(jax.random.key(8), images, train=False))["params"]
    new = distill.init_student_from_teacher(student, params, teacher, teacher_vars["params"], 24)
    assert new["pos_embed"].shape == params["pos_embed"].shape
    jax.tree_util.tree_map(np.testing.assert_array_equal, new["blocks_0"],
                           teacher_vars["params"]["blocks_0"])
    np.testing.assert_array_equal(new["head"]["kernel"], teacher_vars["params"]["head"]["kernel"])
    logits = student.apply({"params": new}, images, patch_size=8)
    assert np.isfinite(np.asarray(logits)).all()


def test_distill_mode_end_to_end(digits_data_dir, jax_cache_dir, tmp_path):
    """config.distill selects the mode: a tiny ViT/4 teacher trained by the trainer, then a
    FlexiViT (base patch 8) student initialised from it. With lr 0 the student stays at its
    init, so at the teacher's patch size it agrees with the teacher everywhere (KL ~ 0)."""
    import ml_collections

    from flexvision.train.trainer import train_and_evaluate

    data_dir = digits_data_dir
    tiny = {"num_classes": 10, "embed_dim": 16, "depth": 1, "num_heads": 2, "mlp_dim": 32,
            "patch_size": (4, 4), "posemb_grid": (4, 4)}

    def config_for(model_name, **updates):
        import os

        from flexvision.engine.configs import get_config
        config = get_config(os.path.join(os.path.dirname(os.path.dirname(
            os.path.abspath(__file__))), "configs", "flexivit_digits.py"))
        config.model.name = model_name
        config.model.kwargs = ml_collections.ConfigDict(tiny)
        config.input.data_dir = data_dir
        config.input.pp = "decode|resize(18)|random_crop(16)|value_range(-1, 1)|onehot(10)"
        config.input.batch_size = 16
        config.eval.pp = "decode|resize(16)|value_range(-1, 1)|onehot(10)"
        config.eval.batch_size = 200
        config.total_steps, config.schedule.warmup_steps, config.log_every = 3, 1, 1
        config.compilation_cache_dir = jax_cache_dir
        for key, value in updates.items():
            setattr(config, key, value)
        return config

    teacher_dir = str(tmp_path / "teacher")
    teacher_config = config_for("vit_micro", flexi=None)
    teacher_config.eval.patch_sizes = ()
    train_and_evaluate(teacher_config, teacher_dir)

    student_config = config_for("flexivit_micro", lr=0.0)
    student_config.model.kwargs.patch_size = (8, 8)
    student_config.flexi.patch_sizes = (4, 8)
    student_config.eval.patch_sizes = (4, 8)
    student_config.distill = ml_collections.ConfigDict(
        {"teacher": {"source": "workdir", "workdir": teacher_dir, "resolution": 16},
         "temperature": 1.0, "label_weight": 0.0, "init_from_teacher": True})
    final = train_and_evaluate(student_config, str(tmp_path / "student"))
    assert final["agreement"]["4"] == 1.0
    assert final["kl"]["4"] < 1e-6
    assert final["accuracy"]["4"] == final["teacher_accuracy"]
    assert 0.0 <= final["agreement"]["8"] <= 1.0 and final["kl"]["8"] >= 0.0


def test_distill_config_with_another_objective_is_an_error(tiny_config, tmp_path):
    """A config.distill block trained with a non-distillation objective (e.g. a custom loss on
    the classification objective) fails before training instead of ignoring the teacher."""
    import dataclasses

    import ml_collections
    import pytest

    from flexvision.train import objective
    from flexvision.train.trainer import train_and_evaluate

    config = tiny_config()
    config.distill = ml_collections.ConfigDict({"teacher": {"source": "workdir",
                                                            "workdir": str(tmp_path / "none")}})

    def custom_loss(config, model, mesh):
        task = objective.classification(config, model, mesh)
        return dataclasses.replace(task, loss_fn=lambda logits, labels: task.loss_fn(
            logits, labels) * 2.0)

    with pytest.raises(ValueError, match="config.distill is set but the objective is "
                                         "'classification'"):
        train_and_evaluate(config, str(tmp_path / "student"), objective_fn=custom_loss)
    assert not (tmp_path / "student" / "checkpoints").exists()
