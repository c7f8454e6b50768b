"""FLOP counting (flexvision.benchmark.flops): the lowered-StableHLO count against XLA's on
CPU for pure contractions, the analytic per-family counts against the lowered count for every
registered family, the fallback when XLA's count is absurd (as on GPU), and utilisation that is
never printed negative or absurd."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import pytest

from flexvision import benchmark, registry
from flexvision.benchmark import flops
from flexvision.benchmark.analysis import xla_flops


def _both(f, *args, count_padding=False):
    lowered = jax.jit(f).lower(*args)
    return flops.lowered_flops(lowered, count_padding=count_padding), xla_flops(lowered.compile())


@pytest.mark.parametrize("m,n,k", [(64, 16, 32), (7, 5, 3)])
def test_lowered_count_of_a_matmul_is_2mnk(m, n, k):
    count, xla = _both(jnp.dot, jnp.ones((m, k)), jnp.ones((k, n)))
    assert count.flops == 2 * m * n * k == xla
    assert (count.dots, count.convolutions) == (1, 0)


def test_lowered_count_of_a_batched_einsum_counts_batch_and_contraction():
    count, xla = _both(lambda a, b: jnp.einsum("bqhd,bkhd->bhqk", a, b),
                       jnp.ones((2, 5, 3, 8)), jnp.ones((2, 7, 3, 8)))
    assert count.flops == 2 * (2 * 3 * 5 * 7) * 8 == xla


CONVS = {  # name: (lhs NHWC, kernel HWIO, strides, padding, rhs dilation, lhs dilation, groups)
    "same_3x3": ((2, 9, 11, 4), (3, 3, 4, 6), (1, 1), "SAME", (1, 1), (1, 1), 1),
    "strided_7x7_pad2": ((1, 19, 17, 3), (7, 7, 3, 5), (4, 4), ((2, 2), (2, 2)), (1, 1), (1, 1), 1),
    "dilated": ((1, 12, 12, 2), (3, 3, 2, 4), (1, 1), "SAME", (2, 2), (1, 1), 1),
    "depthwise": ((2, 10, 10, 8), (3, 3, 1, 8), (2, 2), ((1, 1), (1, 1)), (1, 1), (1, 1), 8),
    "transposed": ((1, 6, 5, 4), (3, 3, 4, 2), (1, 1), ((2, 2), (2, 2)), (1, 1), (2, 2), 1),
}


def _conv(x, w, strides, padding, rhs_dil, lhs_dil, groups):
    return jax.lax.conv_general_dilated(x, w, strides, padding, lhs_dilation=lhs_dil,
                                        rhs_dilation=rhs_dil, feature_group_count=groups,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


@pytest.mark.parametrize("case", sorted(CONVS))
def test_lowered_conv_count_without_padding_taps_equals_xla_forward_and_gradients(case):
    lhs, rhs, strides, padding, rhs_dil, lhs_dil, groups = CONVS[case]
    conv = functools.partial(_conv, strides=strides, padding=padding, rhs_dil=rhs_dil,
                             lhs_dil=lhs_dil, groups=groups)
    x = jax.random.normal(jax.random.PRNGKey(0), lhs)
    w = jax.random.normal(jax.random.PRNGKey(1), rhs)
    count, xla = _both(conv, x, w)
    assert count.convolutions == 1 and count.flops == xla
    # The backward convolutions (input gradient: lhs-dilated; kernel gradient: batch-grouped
    # for depthwise) are pure convolutions too: cotangent in, gradients out. Each multiplies the
    # same (input, kernel) pairs as the forward, so each costs what the forward does.
    g = jnp.ones(jax.eval_shape(conv, x, w).shape)
    backward, xla_backward = _both(lambda x, w, g: jax.vjp(conv, x, w)[1](g), x, w, g)
    assert backward.convolutions == 2 and backward.flops == 2 * count.flops
    if groups == 1:
        assert backward.flops == xla_backward
    else:  # XLA's CPU cost analysis over-counts the batch-grouped kernel gradient
        assert xla_backward > backward.flops


def test_conv_count_with_padding_taps_is_the_dense_window_count():
    x, w = jnp.ones((2, 9, 11, 4)), jnp.ones((3, 3, 4, 6))
    count, xla = _both(lambda x, w: _conv(x, w, (1, 1), "SAME", (1, 1), (1, 1), 1), x, w,
                       count_padding=True)
    assert count.flops == 2 * (2 * 9 * 11 * 6) * (3 * 3 * 4)
    assert count.flops > xla  # XLA leaves out the taps that read padding


def test_input_gradient_of_a_strided_conv_counts_no_dilation_holes():
    """The input gradient of a stride-4 conv is an lhs-dilated conv: its count must be the
    forward's real work (between the forward's count without and with padding taps), not the
    dense window over the zeros inserted between the cotangent's elements."""
    lhs, rhs, strides, padding, rhs_dil, lhs_dil, groups = CONVS["strided_7x7_pad2"]
    conv = functools.partial(_conv, strides=strides, padding=padding, rhs_dil=rhs_dil,
                             lhs_dil=lhs_dil, groups=groups)
    x, w = jnp.ones(lhs), jnp.ones(rhs)
    dense, _ = _both(conv, x, w, count_padding=True)
    valid, _ = _both(conv, x, w, count_padding=False)
    g = jnp.ones(jax.eval_shape(conv, x, w).shape)
    input_grad, _ = _both(lambda w, g: jax.vjp(lambda x: conv(x, w), x)[1](g), w, g,
                          count_padding=True)
    assert input_grad.convolutions == 1
    assert valid.flops <= input_grad.flops <= dense.flops


def test_calls_into_private_functions_are_counted_once_per_call():
    inner = jax.jit(jnp.dot)
    count, xla = _both(lambda a, b: inner(inner(a, b), b), jnp.ones((4, 6)), jnp.ones((6, 6)))
    assert count.flops == 2 * (2 * 4 * 6 * 6) == xla


def _tiny_workload(family, resolution):
    return benchmark.build_workload(registry.tiny_variant(family), resolution=resolution,
                                    patch_size=None, dtype="float32", optimizer="sgd")


# Every model family of flexvision (the benchmark's toy family is registered by its tests only).
MODEL_FAMILIES = sorted(set(registry.families()) - {"benchmark_toy"})


def test_every_registered_model_family_has_an_analytic_formula():
    families = set(MODEL_FAMILIES)
    assert families <= set(flops.ANALYTIC), (
        f"families without an analytic FLOP formula: {sorted(families - set(flops.ANALYTIC))}; "
        "add one to flexvision.benchmark.flops.ANALYTIC")


@pytest.mark.parametrize("resolution", [(32, 32), (40, 56)])
@pytest.mark.parametrize("family", MODEL_FAMILIES)
def test_analytic_count_matches_the_lowered_count_within_2_percent(family, resolution):
    work = _tiny_workload(family, resolution)
    batch = 2
    images = jnp.zeros((batch, *resolution, 3))
    lowered = flops.lowered_flops(jax.jit(work.infer).lower(work.variables, images))
    analytic = flops.analytic_flops(family, work.model, resolution, batch, work.patch_size)
    assert analytic is not None and lowered.flops > 0
    assert abs(analytic - lowered.flops) <= 0.02 * lowered.flops, (family, analytic, lowered)


@pytest.mark.parametrize("patch_size", [4, 8, 16])
def test_flexivit_analytic_count_follows_the_run_time_patch_size(patch_size):
    work = benchmark.build_workload("vit_micro", resolution=(48, 48), patch_size=None, dtype="float32",
                                    optimizer="sgd", overrides={"depth": 1})
    infer = functools.partial(work.model.apply, train=False, patch_size=patch_size)
    images = jnp.zeros((3, 48, 48, 3))
    lowered = flops.lowered_flops(jax.jit(infer).lower(work.variables, images))
    analytic = flops.analytic_flops("vit", work.model, (48, 48), 3, patch_size)
    assert abs(analytic - lowered.flops) <= 0.02 * lowered.flops, (analytic, lowered)


@pytest.mark.parametrize("overrides", [
    {"global_pool": "map"}, {"global_pool": "prr"}, {"global_pool": "none"},
    {"global_pool": "avg", "fc_norm": True, "pool_include_prefix": True},
    {"dist_token": True}, {"num_reg_tokens": 2, "class_token": False, "global_pool": "avg"},
    {"dynamic_img_pad": True}])
def test_vit_analytic_count_covers_pooling_and_token_variants(overrides):
    resolution = (36, 44) if overrides.get("dynamic_img_pad") else (32, 48)
    work = benchmark.build_workload("vit_micro", resolution=resolution, patch_size=None,
                                    dtype="float32", optimizer="sgd",
                                    overrides={"depth": 1, **overrides})
    images = jnp.zeros((2, *resolution, 3))
    lowered = flops.lowered_flops(jax.jit(work.infer).lower(work.variables, images))
    analytic = flops.analytic_flops("vit", work.model, resolution, 2, None)
    assert abs(analytic - lowered.flops) <= 0.02 * lowered.flops, (analytic, lowered)


@pytest.mark.parametrize("xla,lowered,expected", [
    (-1.0, 2000, (2000.0, "lowered")),       # cuBLAS custom call on GPU: XLA reads -1
    (0.0, 2000, (2000.0, "lowered")),
    (100.0, 2000, (2000.0, "lowered")),      # absurdly low: most matmuls hidden
    (2100.0, 2000, (2100.0, "xla")),         # XLA also counts elementwise ops
    (None, 2000, (2000.0, "lowered")),
    (1500.0, None, (1500.0, "xla")),
    (-1.0, None, (None, "none")),
])
def test_choose_flops_falls_back_to_the_lowered_count(xla, lowered, expected):
    assert flops.choose_flops(xla, lowered) == expected


@pytest.mark.parametrize("rate,peak", [(-5e12, 1e12), (5e12, -1.0), (float("nan"), 1e12),
                                       (1e12, None), (None, 1e12), (1e15, 1e12), (0.0, 1e12)])
def test_utilization_is_never_negative_or_absurd(rate, peak):
    fraction, text = flops.utilization(rate, peak)
    assert fraction is None and text.startswith("n/a")


def test_utilization_of_a_sane_rate():
    assert flops.utilization(2.5e14, 1e15) == (0.25, "25%")


def test_datasheet_peaks_of_known_devices_and_none_for_cpu():
    assert flops.datasheet_peak("NVIDIA H200", "bfloat16") == 989e12
    assert flops.datasheet_peak("NVIDIA A100-SXM4-80GB", "float32") == 19.5e12
    assert flops.datasheet_peak("TPU v5 lite", "bfloat16") == 197e12
    assert flops.datasheet_peak("TPU v5p", "bfloat16") == 459e12
    assert flops.datasheet_peak("cpu", "float32") is None
    assert flops.datasheet_peak(jax.devices("cpu")[0].device_kind, "float32") is None


def test_benchmark_with_a_gpu_like_cost_analysis_uses_the_lowered_count_and_prints_no_absurd_figure(
        monkeypatch):
    """XLA's cost analysis is made to read -1 FLOPs, as it does for cuBLAS calls on GPU: the
    benchmark must divide by the lowered count, say so, and print no negative utilisation."""
    import flexvision.benchmark.timing as timing
    import flexvision.benchmark.workloads as workloads

    monkeypatch.setattr(workloads, "xla_flops", lambda compiled: -1.0)
    monkeypatch.setattr(timing, "xla_flops", lambda compiled: -1.0)
    reference = timing.matmul_reference(64)
    assert reference[1] == 2 * 64 ** 3
    result = benchmark.benchmark_config("vit_micro", batch_size=2, resolution=(32, 32),
                                        patch_size=None, overrides={"depth": 1}, warmup=1, repeats=1, min_time=0.0,
                                        reference=reference,
                                        compiler_options={"xla_backend_optimization_level": 0})
    matmul = {"float32": {"size": 64, "flops_per_s": {"median": reference[1] / 1e-3,
                                                      "min": 1.0, "max": 1.0}}}
    workloads.add_utilization(result, matmul)
    for phase in ("inference", "train"):
        report = result[phase]
        assert report["flop_counts"]["used"] == "lowered"
        assert report["flop_counts"]["xla"] == -1.0
        assert report["flops"] == report["flop_counts"]["lowered"] > 0
        for key in ("utilization", "utilization_interleaved", "utilization_datasheet"):
            value = report.get(key)
            assert value is None or 0 < value <= 1.5, (key, value)
    assert result["inference"]["flop_counts"]["analytic"] == pytest.approx(
        result["inference"]["flops"], rel=0.02)
    assert result["attention"] == ["xla"]
    table = benchmark.cli.format_table([result], {})
    percents = [cell for cell in table.split() if cell.endswith("%")]
    assert all(0 < float(cell[:-1]) <= 150 for cell in percents), table
    assert "lowered" in table
    if flops.datasheet_peak(jax.devices()[0].device_kind, "float32") is None:
        assert "n/a" in table  # e.g. every CPU: no datasheet peak
