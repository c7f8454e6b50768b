"""The attention implementation choice (flexvision.layers.attention): a pure, cached function of
static facts; 'xla' on this CPU, 'cudnn' for simulated GPU facts wherever jax 0.10.2's cuDNN
fused attention takes the call. The fused path's numerics can only be checked on a GPU: that test
runs when one is present and is skipped otherwise."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flexvision
from flexvision.layers import attention
from flexvision.layers.attention import AttentionCall, DeviceFacts

H100 = DeviceFacts("gpu", cuda=True, compute_capability=(9, 0), cudnn_version=90800)
A100 = DeviceFacts("gpu", cuda=True, compute_capability=(8, 0), cudnn_version=90800)
ROCM = DeviceFacts("gpu", cuda=False)
CPU = DeviceFacts("cpu")


def _call(q=(8, 197, 12, 64), k=None, dtype="bfloat16", bias=None, train=True):
    k = k or q
    return AttentionCall(q, k, k, dtype, bias, train)


@pytest.mark.parametrize("call,device,expected", [
    (_call(), H100, "cudnn"),                                    # ViT-B/16 at 224, bf16
    (_call(dtype="float16"), A100, "cudnn"),
    (_call(dtype="float32"), H100, "xla"),                       # cuDNN: fp16/bf16 only
    (_call(), CPU, "xla"),
    (_call(), ROCM, "xla"),
    (_call(), DeviceFacts("gpu", True, (9, 0), None), "xla"),    # no cuDNN
    (_call(), DeviceFacts("gpu", True, (7, 0), 90800), "xla"),   # pre-Ampere
    (_call(q=(8, 50, 3, 12)), H100, "xla"),                      # head_dim not a multiple of 8
    (_call(q=(8, 50, 2, 192)), H100, "cudnn"),                   # <= 256 on Hopper
    (_call(q=(8, 50, 2, 192)), A100, "xla"),                     # <= 128 before
    (_call(q=(8, 1, 12, 64), k=(8, 197, 12, 64)), H100, "cudnn"),  # MAP head: one query
    # Swin window attention (64 windows x batch 2, 49 tokens, bias + shifted-window mask):
    (_call(q=(128, 49, 3, 32), bias=(128, 3, 49, 49), train=False), H100, "cudnn"),
    (_call(q=(128, 49, 3, 32), bias=(1, 3, 49, 49), train=False), H100, "cudnn"),
    (_call(q=(128, 49, 3, 32), bias=(128, 3, 49, 49), train=True), H100, "xla"),  # odd + bias
    (_call(q=(128, 64, 3, 32), bias=(128, 3, 64, 64), train=True), H100, "cudnn"),
    (_call(q=(128, 49, 3, 32), bias=(64, 3, 49, 49), train=False), H100, "xla"),  # no broadcast
    # MViTv2 pooled attention: q 56x56+cls, kv pooled to 7x7+cls, decomposed rel-pos bias:
    (_call(q=(2, 3137, 1, 96), k=(2, 50, 1, 96), bias=(2, 1, 3137, 50), train=False), H100,
     "cudnn"),
    (_call(q=(2, 3137, 1, 96), k=(2, 50, 1, 96), bias=(2, 1, 3137, 50), train=True), H100,
     "xla"),
    (_call(q=(2, 3136, 1, 96), k=(2, 49, 1, 96), bias=(2, 1, 3136, 49), train=True), H100, "xla"),
    (_call(q=(2, 3136, 1, 96), k=(2, 50, 1, 96), bias=(2, 1, 3136, 50), train=True), H100,
     "cudnn"),
    (_call(bias=(8, 12, 197, 100)), H100, "xla"),                 # bias not (Tq, Tk)
])
def test_selection_for_simulated_devices(call, device, expected):
    choice, reason = attention.select_implementation(call, device)
    assert choice == expected, reason
    assert (attention.cudnn_refusal(call, device) is None) == (expected == "cudnn")


def test_cpu_picks_xla_for_every_dtype():
    assert attention.device_facts().backend == jax.default_backend()
    for dtype in (jnp.float32, jnp.bfloat16, jnp.float16):
        q = jax.ShapeDtypeStruct((2, 16, 2, 64), dtype)
        expected = "cudnn" if (jax.default_backend() == "gpu" and dtype != jnp.float32
                               and attention.device_facts().cuda) else "xla"
        assert attention.attention_implementation(q, q, q) == expected


def test_the_choice_is_cached_and_logged_once_per_static_shape(caplog):
    call = _call(q=(3, 17, 5, 24), dtype="float16")  # a shape no other test uses
    with caplog.at_level(logging.INFO, logger="flexvision.layers.attention"):
        first = attention.select_implementation(call, H100)
        second = attention.select_implementation(call, H100)
    assert first == second == ("cudnn", "fused flash attention supports the call")
    lines = [r for r in caplog.records if "(3, 17, 5, 24)" in r.getMessage()]
    assert len(lines) == 1 and "cudnn" in lines[0].getMessage()


def test_a_boolean_mask_counts_as_a_bias():
    q = jax.ShapeDtypeStruct((2, 15, 2, 64), jnp.bfloat16)
    mask = jax.ShapeDtypeStruct((1, 1, 15, 15), jnp.bool_)
    assert attention.attention_implementation(q, q, q, mask=mask, train=True,
                                              device=H100) == "xla"   # odd length, training
    assert attention.attention_implementation(q, q, q, mask=mask, train=False,
                                              device=H100) == "cudnn"


def test_models_record_their_choice_when_traced():
    model = flexvision.create_model("vit_micro", depth=2)
    images = jnp.zeros((1, 32, 32, 3))
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), images))
    with attention.record_attention_choices() as recorded:
        jax.eval_shape(lambda v: model.apply(v, images), variables)
    assert recorded == ["xla", "xla"]  # one per block, on this CPU


def _reference(q, k, v, bias):
    """float64 NumPy attention (Vaswani et al. 2017, eq. 1) of upcast inputs."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    if bias is not None:
        logits = logits + np.asarray(bias, np.float64)
    logits = logits - logits.max(-1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", probs, v)


GPU_CASES = {  # name: (q shape, k shape, bias shape or None, train)
    "vit_b16": ((4, 197, 12, 64), (4, 197, 12, 64), None, True),
    "swin_window": ((128, 49, 3, 32), (128, 49, 3, 32), (128, 3, 49, 49), False),
    "swin_window_even_train": ((128, 64, 3, 32), (128, 64, 3, 32), (1, 3, 64, 64), True),
    "mvit_pooled": ((2, 3137, 1, 96), (2, 50, 1, 96), (2, 1, 3137, 50), False),
}


@pytest.mark.skipif(jax.default_backend() != "gpu" or not attention.device_facts().cuda,
                    reason="cuDNN fused attention needs an NVIDIA GPU")
@pytest.mark.parametrize("case", sorted(GPU_CASES))
def test_fused_attention_matches_float64_reference_on_gpu(case):
    """bf16 inputs: ||out - ref|| / ||ref|| <= 1e-2 (bf16 operands land between 1e-3 and 1e-2),
    for the fused path and jax.nn's XLA path alike; gradients where the case trains."""
    q_shape, k_shape, bias_shape, train = GPU_CASES[case]
    keys = jax.random.split(jax.random.PRNGKey(len(case)), 4)
    q = jax.random.normal(keys[0], q_shape, jnp.bfloat16)
    k = jax.random.normal(keys[1], k_shape, jnp.bfloat16)
    v = jax.random.normal(keys[2], k_shape, jnp.bfloat16)
    bias = (jax.random.normal(keys[3], bias_shape, jnp.bfloat16) if bias_shape else None)
    assert attention.attention_implementation(q, k, v, bias=bias, train=train) == "cudnn"
    fused = jax.jit(lambda q, k, v, b: attention.dot_product_attention(q, k, v, bias=b,
                                                                       train=train))
    out = np.asarray(fused(q, k, v, bias).astype(jnp.float32))
    assert np.isfinite(out).all()
    ref = _reference(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                     None if bias is None else bias.astype(jnp.float32))
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) <= 1e-2
    if train:
        def loss(fn, q, k, v):
            return jnp.sum(fn(q, k, v).astype(jnp.float32) * jnp.arange(q_shape[-1]))
        grads_fused = jax.grad(lambda q, k, v: loss(
            lambda *a: attention.dot_product_attention(*a, bias=bias, train=True), q, k, v),
            argnums=(0, 1, 2))(q, k, v)
        grads_xla = jax.grad(lambda q, k, v: loss(
            lambda *a: jax.nn.dot_product_attention(*a, bias=bias, implementation="xla"),
            q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32)),
            argnums=(0, 1, 2))(q, k, v)
        for got, want in zip(grads_fused, grads_xla):
            got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
            assert np.linalg.norm(got - want) / np.linalg.norm(want) <= 2e-2


@pytest.mark.parametrize("train,expected", [(False, "cudnn"), (True, "xla")])
def test_swin_window_attention_passes_train_to_the_choice(monkeypatch, train, expected):
    """Swin's 7x7 windows (49 tokens, bias + mask) on simulated Hopper facts: the fused kernel
    for inference, XLA for training (odd length with a bias). jax.nn's cuDNN path cannot run on
    this CPU, so the requested implementation is recorded and jax.nn's XLA path computes."""
    requested = []
    original = jax.nn.dot_product_attention

    def recording(*args, implementation=None, **kwargs):
        requested.append(implementation)
        return original(*args, implementation="xla", **kwargs)

    monkeypatch.setattr(attention, "device_facts", lambda: H100)
    monkeypatch.setattr(jax.nn, "dot_product_attention", recording)
    model = flexvision.create_model("swin_tiny_patch4_window7_224", embed_dim=16, depths=[2],
                                    num_heads=[1], window_size=7, num_classes=4,
                                    dtype=jnp.bfloat16)
    images = jnp.zeros((1, 56, 56, 3))
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), images))
    requested.clear()  # init traced the inference path
    with attention.record_attention_choices() as recorded:
        jax.eval_shape(lambda v: model.apply(v, images, train=train,
                                             rngs={"dropout": jax.random.PRNGKey(1)}), variables)
    assert recorded == [expected, expected]  # W-MSA and SW-MSA (bias + mask)
    # jax.nn is asked for cudnn when chosen; the XLA choice on this CPU is the heads-major form
    assert requested == [c for c in recorded if c == "cudnn"]
