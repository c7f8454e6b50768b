"""Sharding library in-process: mesh specs, rules, tactics, optimizer-state matching, errors.

Specs are checked on an ``AbstractMesh`` (no devices needed); the runs on 8 simulated devices are
in test_sharding_mesh.py, the two-process run in test_multihost.py.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

import flexvision
from flexvision.engine import distributed, sharding

MESH_3D = AbstractMesh((2, 2, 2), ("data", "fsdp", "model"))
TINY_VIT = dict(embed_dim=32, depth=1, num_heads=2, mlp_dim=64, num_classes=10, patch_size=(4, 4),
                posemb_grid=(4, 4))


@pytest.fixture(scope="module")
def boxed_vit():
    model = flexvision.create_model("flexivit_micro", **TINY_VIT)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)),
                                             patch_size=4))


def spec_table(shardings):
    """'/'-joined path -> PartitionSpec of a (boxed or plain) sharding tree."""
    plain = sharding.unbox(shardings)
    return {"/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path):
            s.spec for path, s in jax.tree_util.tree_flatten_with_path(plain)[0]}


# ---- mesh -------------------------------------------------------------------------------------

def test_create_mesh_fills_minus_one_and_accepts_mappings():
    mesh = sharding.create_mesh([("data", -1)])
    assert mesh.shape == {"data": jax.device_count()}
    mesh = sharding.create_mesh(ml_collections.ConfigDict({"data": 1, "fsdp": -1}))
    assert mesh.axis_names == ("data", "fsdp")


@pytest.mark.parametrize("axes, message", [
    ([("data", 2)], "needs 2 devices"),
    ([("data", -1), ("fsdp", -1)], "at most one mesh axis may have size -1"),
    ([("data", 1), ("data", 1)], "unique"),
    ([("data", 0)], "sizes are positive integers"),
    ([("data",)], "not an (axis name, size) pair"),
    ([(3, 1)], "non-empty string"),
    ("data", "list of (axis name, size) pairs"),
    ([], "no axes"),
])
def test_create_mesh_rejects_bad_specs(axes, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        sharding.create_mesh(axes)


def test_batch_spec_splits_over_data_and_fsdp_only():
    assert sharding.batch_spec(MESH_3D, 4) == P(("data", "fsdp"), None, None, None)
    assert sharding.batch_spec(AbstractMesh((8,), ("data",)), 1) == P("data")
    assert sharding.batch_spec(AbstractMesh((8,), ("model",)), 2) == P(None, None)


# ---- config and rules -------------------------------------------------------------------------

@pytest.mark.parametrize("config, message", [
    ({"tactic": "fsdp"}, "unknown keys"),
    ({"params": "zero3"}, "unknown sharding tactic 'zero3'"),
    ({"params": [("(", "fsdp")]}, "bad regex"),
    ({"params": ["fsdp"]}, "not a \\(regex, tactic\\) pair"),
    ({"rules": [("mlp",)]}, "is not a pair"),
    ({"rules": [("mlp", 3)]}, "maps a logical axis to None, a mesh axis name"),
    ({"fsdp_min_size": -1}, "non-negative integer"),
])
def test_sharding_options_reject_bad_config(config, message):
    with pytest.raises(ValueError, match=message):
        sharding.sharding_options(config)


def test_default_rules_drop_mesh_axes_the_mesh_lacks():
    rules = dict(sharding.logical_rules(AbstractMesh((4,), ("data",))))
    assert rules == {"batch": "data", "heads": None, "mlp": None, "conv_out": None}
    rules = dict(sharding.logical_rules(MESH_3D))
    assert rules["batch"] == ("data", "fsdp") and rules["mlp"] == "model"


def test_configured_rules_come_first_and_must_name_mesh_axes():
    rules = sharding.logical_rules(MESH_3D, {"rules": [("mlp", None), ("embed", "model")]})
    assert rules[:2] == (("mlp", None), ("embed", "model"))
    with pytest.raises(ValueError, match="only has axes \\['data', 'fsdp', 'model'\\]"):
        sharding.logical_rules(MESH_3D, {"rules": [("mlp", "tensor")]})


# ---- tactics ----------------------------------------------------------------------------------

def test_fsdp_shards_the_largest_divisible_free_dimension():
    mesh = AbstractMesh((4,), ("fsdp",))
    assert sharding.fsdp_spec([None, None], (6, 8), mesh, min_size=0) == [None, "fsdp"]
    assert sharding.fsdp_spec([None, None], (12, 8), mesh, min_size=0) == ["fsdp", None]
    assert sharding.fsdp_spec([None, None], (6, 10), mesh, min_size=0) == [None, None]
    assert sharding.fsdp_spec([None, None], (16, 8), mesh, min_size=1000) == [None, None]
    assert sharding.fsdp_spec([None, "model"], (16, 8), MESH_3D, min_size=0) == ["fsdp", "model"]
    assert sharding.fsdp_spec(["fsdp", None], (16, 8), MESH_3D, min_size=0) == ["fsdp", None]
    assert sharding.fsdp_spec([None], (16,), AbstractMesh((4,), ("data",)), min_size=0) == [None]


def test_logical_spec_leaves_indivisible_dimensions_unsharded():
    rules = sharding.logical_rules(MESH_3D)
    assert sharding.logical_spec(("embed", "mlp"), (32, 64), MESH_3D, rules) == [None, "model"]
    assert sharding.logical_spec(("embed", "mlp"), (32, 3), MESH_3D, rules) == [None, None]
    with pytest.raises(ValueError, match="do not match shape"):
        sharding.logical_spec(("embed",), (32, 64), MESH_3D, rules)


def test_vit_tensor_parallel_and_fsdp_specs(boxed_vit):
    specs = spec_table(sharding.tree_shardings(boxed_vit, MESH_3D, {"fsdp_min_size": 1024}))
    assert specs["params/blocks_0/attn/qkv/kernel"] == P("fsdp", "model")  # 32x96 = 3072
    assert specs["params/blocks_0/attn/qkv/bias"] == P("model")
    assert specs["params/blocks_0/attn/proj/kernel"] == P("model", "fsdp")  # 32x32 = 1024
    assert specs["params/blocks_0/mlp/fc1/kernel"] == P("fsdp", "model")
    assert specs["params/blocks_0/mlp/fc2/kernel"] == P("model", "fsdp")
    assert specs["params/blocks_0/mlp/fc2/bias"] == P()  # 32 < fsdp_min_size
    # 4x4x3x32 = 1536: channels go to model; of the free dims the largest divisible (a tap) to fsdp
    assert specs["params/patch_embed/kernel"] == P(None, "fsdp", None, "model")
    assert specs["params/head/kernel"] == P()  # 320 elements


def test_data_parallel_default_replicates_everything(boxed_vit):
    mesh = AbstractMesh((8,), ("data",))
    specs = spec_table(sharding.tree_shardings(boxed_vit, mesh))
    assert set(specs.values()) == {P()}


def test_regex_tactics_first_match_wins(boxed_vit):
    config = {"params": [("/mlp/", "replicate"), ("qkv/kernel$", "fsdp"), (".*", "logical")],
              "fsdp_min_size": 0}
    specs = spec_table(sharding.tree_shardings(boxed_vit, MESH_3D, config))
    assert specs["params/blocks_0/mlp/fc1/kernel"] == P()
    assert specs["params/blocks_0/attn/qkv/kernel"] == P(None, "fsdp")  # fsdp only: 96 > 32
    assert specs["params/blocks_0/attn/proj/kernel"] == P("model")
    assert spec_table(sharding.tree_shardings(boxed_vit, MESH_3D, {"params": "replicate"})
                      )["params/blocks_0/attn/qkv/kernel"] == P()


def test_boxed_tree_keeps_its_structure(boxed_vit):
    shardings = sharding.tree_shardings(boxed_vit, MESH_3D)
    assert (jax.tree_util.tree_structure(shardings, is_leaf=lambda x: isinstance(x, nn.Partitioned))
            == jax.tree_util.tree_structure(boxed_vit, is_leaf=lambda x: isinstance(x, nn.Partitioned)))


@pytest.mark.parametrize("boxed_state", [False, True])
def test_optimizer_state_follows_its_parameters(boxed_vit, boxed_state):
    """Adam's mu and nu get their parameter's sharding, boxed or matched by path and shape."""
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
    params = boxed_vit["params"] if boxed_state else sharding.unbox(boxed_vit["params"])
    state = {"params": params, "opt_state": jax.eval_shape(tx.init, params)}
    config = {"fsdp_min_size": 1024}
    specs = spec_table(sharding.tree_shardings(state, MESH_3D, config,
                                               reference=None if boxed_state else boxed_vit))
    param_specs = {k[len("params/"):]: v for k, v in specs.items() if k.startswith("params/")}
    moments = 0
    for path, spec in specs.items():
        if "/mu/" in path or "/nu/" in path:
            moments += 1
            assert spec == param_specs[path.split("/mu/" if "/mu/" in path else "/nu/")[1]], path
        elif path.startswith("opt_state"):
            assert spec == P(), path  # counts
    assert moments == 2 * len(param_specs)
    assert param_specs["blocks_0/attn/qkv/kernel"] == P("fsdp", "model")


def test_unmatched_unboxed_leaves_still_get_fsdp_by_shape():
    tree = {"w": jax.ShapeDtypeStruct((64, 48), jnp.float32), "b": jax.ShapeDtypeStruct((3,), jnp.float32)}
    specs = spec_table(sharding.tree_shardings(tree, MESH_3D, {"fsdp_min_size": 1024}))
    assert specs == {"w": P("fsdp"), "b": P()}


# ---- activations and memory --------------------------------------------------------------------

def test_activation_rules_constrain_logically_named_activations():
    mesh = sharding.create_mesh([("data", -1)])
    inside = []

    def f(x):
        inside.append(nn.get_logical_axis_rules())
        return nn.with_logical_constraint(x * 2.0, ("batch", "embed"))

    with sharding.activation_rules(mesh) as rules:
        out = jax.jit(f)(jnp.ones((4, 3)))
        text = jax.jit(f).lower(jnp.ones((4, 3))).as_text()
    assert inside[0] == rules and dict(rules)["batch"] == "data"
    assert "sharding_constraint" in text
    np.testing.assert_array_equal(out, 2.0)
    assert not nn.get_logical_axis_rules()


def test_per_device_bytes_counts_shards():
    mesh = sharding.create_mesh([("data", -1)])
    tree = {"w": jax.ShapeDtypeStruct((64, 48), jnp.float32)}
    assert sharding.per_device_bytes(tree, sharding.tree_shardings(tree, mesh)) == 64 * 48 * 4
    live = sharding.live_bytes_per_device({"w": jnp.zeros((64, 48))})
    assert list(live.values()) == [64 * 48 * 4]


# ---- distributed (single process) -------------------------------------------------------------

def test_initialize_is_a_no_op_for_one_process():
    info = distributed.initialize(environ={})
    assert (info.process_count, info.process_index, info.source) == (1, 0, "single-process")
    info = distributed.initialize(environ={"JAX_NUM_PROCESSES": "1"})
    assert info.source == "environment" and info.process_count == 1
    config = ml_collections.ConfigDict({"distributed": {"num_processes": 1}})
    assert distributed.initialize(config=config, environ={}).source == "config"
    assert distributed.is_main_process()


@pytest.mark.parametrize("environ, message", [
    ({"JAX_NUM_PROCESSES": "2"}, "needs the coordinator address"),
    ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2", "JAX_COORDINATOR_ADDRESS": "127.0.0.1:1"},
     "must be in \\[0, 2\\)"),
    ({"JAX_NUM_PROCESSES": "two"}, "must be an integer"),
    ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0", "JAX_COORDINATOR_ADDRESS": "localhost"},
     "must be 'host:port'"),
    ({"JAX_NUM_PROCESSES": "0"}, "must be >= 1"),
])
def test_initialize_rejects_incomplete_settings(environ, message):
    with pytest.raises(ValueError, match=message):
        distributed.initialize(environ=environ)


def test_explicit_arguments_override_the_environment():
    with pytest.raises(ValueError, match="from arguments"):
        distributed.initialize(num_processes=2, environ={"JAX_NUM_PROCESSES": "1"})


@pytest.mark.parametrize("environ, cluster", [
    ({}, None),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}, None),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "16"}, "slurm"),
    ({"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3"}, "tpu"),
    ({"TPU_WORKER_HOSTNAMES": "localhost"}, None),
    ({"OMPI_COMM_WORLD_SIZE": "4"}, "ompi"),
])
def test_detected_cluster(environ, cluster):
    assert distributed.detected_cluster(environ) == cluster


def test_process_rows_split_the_global_batch():
    assert distributed.process_rows(16) == slice(0, 16)
    assert distributed.process_batch_size(16) == 16


def test_default_config_holds_every_key_at_its_default():
    config = sharding.default_config()
    assert sharding.sharding_options(config) == sharding.sharding_options(None)
    config.params = "replicate"  # every key exists, so command-line overrides can set it
    assert sharding.sharding_options(config).params == ((".*", "replicate"),)
