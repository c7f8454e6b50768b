"""The speed benchmark: FLOP counting, end-to-end runs with valid JSON, the persistent cache."""

from __future__ import annotations

import json
import pathlib
import runpy

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from flexvision import benchmark, registry

TOY = "tests.benchmark_toy_models"


@pytest.fixture(autouse=True, scope="module")
def toy_models():
    """toy_flex_patch and toy_batchnorm, registered for this module's tests only."""
    with registry.scoped_registrations():
        from tests import benchmark_toy_models  # pylint: disable=import-outside-toplevel

        benchmark_toy_models.register()  # the import registers only the first time
        yield

# Per family: a representative registered model and the create_model overrides (JSON, as on the
# command line) that make it tiny, a block or two of small width, so that its inference and train
# step compile in seconds. Every registered family must have an entry (checked below).
# The benchmark runs each family's registered tiny variant (the model contract: one per family,
# registered in the family's own file); the toy family is this file's own.
TOY_CASE = ("toy_flex_patch", {})
TINY_RESOLUTION = 32
FAST_COMPILE = {"xla_backend_optimization_level": 0}
# Extra configurations with another code path: DeiT's train mode returns two heads; the toy
# BatchNorm model keeps batch_stats.
EXTRA = {"toy_batchnorm": ("toy_batchnorm", {}),
         "deit_distilled": ("deit_tiny_distilled_patch16_224",
                            {"depth": 1, "embed_dim": 48, "num_heads": 2})}


def _registered_families() -> list[str]:
    return sorted({registry.model_family(n) for n in registry.list_models()})


@pytest.mark.parametrize("m,n,k", [(64, 16, 32), (128, 256, 96), (7, 5, 3)])
def test_cost_analysis_of_a_matmul_counts_2mnk_flops(m, n, k):
    compiled = jax.jit(jnp.dot).lower(jnp.ones((m, k)), jnp.ones((k, n))).compile()
    assert benchmark.xla_flops(compiled) == 2 * m * n * k


def test_matmul_reference_reports_its_flops_and_a_positive_rate():
    result = benchmark.matmul_flops_per_second(128, jnp.float32, repeats=2, min_time=0.01)
    assert result["flops"] == 2 * 128 ** 3
    rate = result["flops_per_s"]
    assert 0 < rate["min"] <= rate["median"] <= rate["max"]


def _check_phase(phase: dict, batch_size: int) -> None:
    for key in ("compile_s", "lower_s", "xla_compile_s", "flops", "utilization",
                "utilization_interleaved"):
        assert isinstance(phase[key], float) and phase[key] > 0, key
    images = phase["images_per_s"]
    assert 0 < images["min"] <= images["median"] <= images["max"]
    seconds = phase["seconds_per_step"]
    np.testing.assert_allclose(images["median"], batch_size / seconds["median_s"])
    np.testing.assert_allclose(phase["flops_per_s"]["median"], phase["flops"] / seconds["median_s"])
    np.testing.assert_allclose(phase["utilization_interleaved"], phase["flops_per_s"]["median"]
                               / phase["reference_matmul_flops_per_s"]["median"])
    assert phase["memory"]["peak_bytes"] >= phase["memory"]["argument_bytes"] > 0


@pytest.mark.parametrize("case", sorted(set(_registered_families()) | {"benchmark_toy"})
                         + sorted(EXTRA))
def test_benchmark_runs_every_family_and_writes_valid_json(case, tmp_path, capsys):
    if case in EXTRA:
        name, overrides = EXTRA[case]
    elif case == "benchmark_toy":
        name, overrides = TOY_CASE
    else:  # a family without a tiny variant fails here, by name
        name, overrides = registry.tiny_variant(case), {}
    path = tmp_path / "bench.json"
    argv = ["--import_modules", TOY, "--models", name, "--batch_size", "2",
            "--resolutions", str(TINY_RESOLUTION), "--repeats", "2", "--warmup", "1",
            "--min_time", "0.01", "--matmul_size", "256", "--json", str(path),
            "--optimizer", "adamw" if case == "vit" else "sgd",
            # The test checks the pipeline, not the speed: XLA -O0 halves the compile time.
            "--compiler_options", json.dumps(FAST_COMPILE)]
    if overrides:
        argv += ["--overrides", json.dumps(overrides)]
    benchmark.main(argv)
    report = json.loads(path.read_text())
    assert report["environment"]["backend"] == jax.default_backend()
    assert len(report["environment"]["load_average"]) == 3
    assert report["matmul"]["float32"]["flops"] == 2 * 256 ** 3
    (result,) = report["results"]
    assert result["model"] == name and result["family"] == registry.model_family(name)
    assert result["overrides"] == overrides and result["compiler_options"] == FAST_COMPILE
    assert result["parameters"] > 0
    for phase in ("inference", "train"):
        _check_phase(result[phase], batch_size=2)
    # A train step (forward + backward + update) costs more than inference.
    assert result["train"]["flops"] > result["inference"]["flops"]
    assert result["has_batch_stats"] == (case in ("hrnet", "toy_batchnorm"))
    table = capsys.readouterr().out
    assert "img/s median [min-max]" in table and "matmul 256^2 float32" in table
    assert name in table


def test_json_overrides_take_the_fields_types():
    from flexvision.models.hrnet import StageSpec
    from flexvision.registry import coerce_overrides

    overrides = coerce_overrides("hrnet_w18_small", {
        "stages": [[1, "bottleneck", [1], [8]], [1, "basic", [1, 1], [8, 16]]], "stem_width": 8})
    assert overrides["stages"] == (StageSpec(1, "bottleneck", (1,), (8,)),
                                   StageSpec(1, "basic", (1, 1), (8, 16)))
    assert overrides["stem_width"] == 8
    mvit = coerce_overrides("mvitv2_tiny", {"stride_q": [[1, 1], [2, 2]], "depths": [1, 1]})
    assert mvit == {"stride_q": ((1, 1), (2, 2)), "depths": (1, 1)}
    by_name = coerce_overrides("hrnet_w18_small", {"stages": [
        {"num_modules": 1, "block": "bottleneck", "num_blocks": [1], "num_channels": [8]}]})
    assert by_name["stages"] == (StageSpec(1, "bottleneck", (1,), (8,)),)
    assert coerce_overrides("vit_micro", None) == {}


def test_compiler_options_ab_in_one_process(tmp_path, capsys):
    path = tmp_path / "ab.json"
    benchmark.main(["--import_modules", TOY, "--models", "toy_batchnorm", "--batch_size", "2",
                    "--resolutions", "16", "--repeats", "2", "--warmup", "1", "--min_time",
                    "0.001", "--matmul_size", "64", "--no_inference", "--json", str(path),
                    "--compare_compiler_options", json.dumps([{}, FAST_COMPILE])])
    (ab,) = json.loads(path.read_text())["compiler_options_ab"]
    assert ab["phase"] == "train" and [v["compiler_options"] for v in ab["variants"]] == [
        {}, FAST_COMPILE]
    baseline, other = ab["variants"]
    assert baseline["speedup"] == 1.0 and baseline["relative_difference"] == 0.0
    assert other["speedup"] > 0 and other["relative_difference"] < 1e-5  # same math, -O0
    assert "compiler options, toy_batchnorm train" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        benchmark.make_parser().parse_args(["--compare_compiler_options", '{"a": 1}'])


def test_patch_sizes_and_batch_stats_are_detected(tmp_path):
    path = tmp_path / "bench.json"
    benchmark.main(["--models", "toy_flex_patch,toy_batchnorm", "--patch_sizes", "4,8",
                    "--batch_size", "2", "--resolutions", "16x24", "--repeats", "1",
                    "--warmup", "1", "--min_time", "0.001", "--matmul_size", "64",
                    "--no_train", "--json", str(path)])
    results = json.loads(path.read_text())["results"]
    configs = [(r["model"], r["patch_size"], r["has_batch_stats"]) for r in results]
    # The BatchNorm model takes no patch size: one configuration, not one per patch size.
    assert configs == [("toy_flex_patch", 4, False), ("toy_flex_patch", 8, False),
                       ("toy_batchnorm", None, True)]
    flops = {r["patch_size"]: r["inference"]["flops"] for r in results}
    assert flops[4] > flops[8]  # a smaller patch means more tokens, more work


@pytest.mark.parametrize("seed", [0, 1, 3, 17])
def test_random_patch_sizes_are_the_trainers_draws(seed):
    from flexvision.engine import patch_schedule

    sizes = benchmark.workloads.FLEXIVIT_PATCH_SIZES
    flexi = ml_collections.ConfigDict({"patch_sizes": sizes, "probs": "uniform"})
    trainer = [patch_schedule.patch_size_for_step(flexi, seed, step) for step in range(60)]
    assert [benchmark.draw_patch_size(seed, step, sizes) for step in range(60)] == trainer
    assert set(trainer) <= set(sizes)


def test_random_patch_draw_of_seed_0_is_the_trainers():
    # The trainer's first five patch sizes for seed 0 over FlexiViT's sizes (issue 15: the old
    # benchmark formula drew 40, 20, 48, 20, 16 here).
    sizes = benchmark.workloads.FLEXIVIT_PATCH_SIZES
    assert [benchmark.draw_patch_size(0, step, sizes) for step in range(5)] == [24, 40, 8, 40, 40]


def test_second_random_patch_run_compiles_nothing(tmp_path):
    args = benchmark.make_parser().parse_args([
        "--import_modules", TOY, "--random_patch_steps", "5", "--random_patch_model",
        "toy_flex_patch", "--random_patch_sizes", "4,8", "--random_patch_resolution", "16",
        "--batch_size", "2", "--optimizer", "sgd", "--cache_dir", str(tmp_path / "cache")])
    first, second = benchmark.random_patch_benchmark(args)
    from flexvision.engine import patch_schedule
    trainer = [patch_schedule.patch_size_for_step({"patch_sizes": [4, 8]}, 0, s) for s in range(5)]
    assert first["drawn"] == second["drawn"] == trainer and first["executables"] == 2
    assert first["cache_misses"] == first["executables"] and first["cache_hits"] == 0
    assert second["cache_misses"] == 0 and second["cache_hits"] == second["executables"]
    # Cache retrieval replaces XLA compilation: the warm run spends far less time compiling.
    assert second["xla_compile_or_cache_load_s"] < first["xla_compile_or_cache_load_s"]
    for run in (first, second):
        assert run["compile_s"] == pytest.approx(run["lower_s"] + run["xla_compile_or_cache_load_s"])
    assert first["final_loss"] == pytest.approx(second["final_loss"], rel=1e-5)


def test_bad_input_says_what_is_accepted():
    with pytest.raises(ValueError, match="HEIGHTxWIDTH"):
        benchmark.parse_resolution("224x")
    with pytest.raises(ValueError, match="matches no registered model"):
        benchmark.resolve_models("no_such_family_*")
    with pytest.raises(ValueError, match="does not take patch_size"):
        benchmark.random_patch_run("toy_batchnorm", steps=1, patch_sizes=(4,), batch_size=1,
                                   resolution=(8, 8))


def test_flexible_patch_overhead_against_a_native_model():
    c = benchmark.flexi_overhead("flexivit_micro", batch_size=2, resolution=(48, 48),
                                 patch_size=12, overrides={"depth": 1}, repeats=2, warmup=1,
                                 min_time=0.01)
    assert c["native_overrides"]["depth"] == 1
    assert c["native_overrides"]["patch_size"] == (12, 12)
    assert c["native_overrides"]["posemb_grid"] == (4, 4)
    # PI-resizing the kernel and resampling the posemb are the only extra work.
    assert 0 < c["flop_overhead"] < 0.5
    for key in ("flexible_images_per_s", "native_images_per_s"):
        assert 0 < c[key]["min"] <= c[key]["median"] <= c[key]["max"]


def _fake_workdir(path: pathlib.Path, model: str, accuracy: dict, flexi_patch_sizes) -> str:
    """A trainer workdir as flexvision.train leaves it: config.json (model.name, model.kwargs,
    flexi) and final_eval.json (accuracy per patch size, None where the size does not tile)."""
    path.mkdir()
    config = {"model": {"name": model, "kwargs": {"depth": 1, "num_classes": 10}},
              "flexi": {"patch_sizes": flexi_patch_sizes} if flexi_patch_sizes else None}
    (path / "config.json").write_text(json.dumps(config))
    table = {str(p): a for p, a in accuracy.items()}
    (path / "final_eval.json").write_text(json.dumps(
        {"step": 10, "split": "test", "accuracy": table, "loss": table,
         "by_resolution": {"native": {"accuracy": table, "loss": table}}}))
    return str(path)


def test_speed_accuracy_curve_writes_png_json_and_table(tmp_path):
    flexi = _fake_workdir(tmp_path / "flexi", "flexivit_micro", {8: 0.9, 16: 0.8, 20: None},
                          [8, 16])
    fixed = _fake_workdir(tmp_path / "fixed", "vit_micro", {8: 0.95}, None)
    script = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "speed_accuracy.py"
    speed_accuracy = runpy.run_path(str(script))
    outdir = tmp_path / "out"
    out = speed_accuracy["main"](["--workdir", flexi, "--baseline_workdir", fixed,
                                  "--resolution", "48", "--batch_size", "2", "--repeats", "2",
                                  "--min_time", "0.01", "--outdir", str(outdir)])
    report = json.loads((outdir / "speed_accuracy.json").read_text())
    # The model and its overrides come from config.json; the untileable patch 20 is skipped.
    assert report["meta"]["model"] == "flexivit_micro"
    assert report["meta"]["overrides"] == {"depth": 1, "num_classes": 10}
    rows = report["rows"]
    assert [(r["patch_size"], r["accuracy"], r["tokens"]) for r in rows] == [(8, 0.9, 36),
                                                                             (16, 0.8, 9)]
    assert rows[0]["gflops_per_image"] > rows[1]["gflops_per_image"]
    (baseline,) = report["baselines"]
    assert baseline["model"] == "vit_micro" and baseline["native_patch_size"] == 8
    assert [(r["patch_size"], r["accuracy"]) for r in baseline["rows"]] == [(8, 0.95)]
    for row in rows + baseline["rows"]:
        speed = row["images_per_s"]
        assert 0 < speed["min"] <= speed["median"] <= speed["max"]
    assert (outdir / "speed_accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (outdir / "speed_accuracy.md").read_text()
    assert "| 16 | 9 |" in table and "80.00% |" in table and "95.00% (trained) |" in table
    assert "random patch size in {8, 16}" in table and "trained at patch 8 only" in table
    assert out["paths"]["png"].endswith("speed_accuracy.png")
    with pytest.raises(ValueError, match="do not tile"):
        speed_accuracy["main"](["--workdir", flexi, "--resolution", "40",
                                "--outdir", str(tmp_path / "bad")])


def test_profile_attributes_time_to_hlo_instructions_and_matmuls(tmp_path):
    result = benchmark.benchmark_config("toy_batchnorm", batch_size=2, resolution=(16, 16),
                                        patch_size=None, train=False, repeats=1, warmup=1,
                                        min_time=0.001, profile=True)
    profile = result["inference"]["profile"]
    assert profile["instruction_seconds_per_call"] > 0
    assert "matmul" in profile["by_kind"]  # the conv and the head's dot
    assert sum(k["fraction"] for k in profile["by_kind"].values()) == pytest.approx(1.0)
    kinds = {e["op_name"].split("/")[-1]: e["kind"] for e in profile["top"]}
    assert any(kind == "matmul" for kind in kinds.values())


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_heads_major_attention_equals_jax_nn(dtype):
    from flexvision.layers.attention import heads_major_attention

    keys = jax.random.split(jax.random.PRNGKey(0), 5)
    q, k, v = (jax.random.normal(key, (2, 7, 3, 8), dtype) for key in keys[:3])
    bias = jax.random.normal(keys[3], (1, 3, 7, 7), dtype)
    mask = jax.random.bernoulli(keys[4], 0.7, (2, 1, 7, 7)).at[..., 0].set(True)
    variants = ({}, {"bias": bias}, {"mask": mask, "scale": 0.3}, {"bias": bias, "mask": mask})

    @jax.jit  # one compilation for every variant
    def both(q, k, v):
        return [(heads_major_attention(q, k, v, **kwargs),
                 jax.nn.dot_product_attention(q, k, v, implementation="xla", **kwargs))
                for kwargs in variants]

    for ours, ref in both(q, k, v):
        assert ours.dtype == ref.dtype
        tol = 1e-6 if dtype == jnp.float32 else 2e-2
        np.testing.assert_allclose(np.asarray(ours, np.float32), np.asarray(ref, np.float32),
                                   atol=tol, rtol=tol)


def test_each_result_is_printed_and_saved_as_soon_as_measured(tmp_path, capsys, monkeypatch):
    from flexvision.benchmark import cli

    measure = cli.benchmark_config

    def cut_short_at_the_second_model(name, **kwargs):
        if name == "toy_batchnorm":
            raise KeyboardInterrupt  # what a time limit does to a run
        return measure(name, **kwargs)

    monkeypatch.setattr(cli, "benchmark_config", cut_short_at_the_second_model)
    path = tmp_path / "partial.json"
    with pytest.raises(KeyboardInterrupt):
        cli.main(["--import_modules", TOY, "--models", "toy_flex_patch,toy_batchnorm",
                  "--batch_size", "2", "--resolutions", "16", "--repeats", "1", "--warmup", "1",
                  "--min_time", "0.001", "--matmul_size", "64", "--no_train",
                  "--json", str(path)])
    (result,) = json.loads(path.read_text())["results"]
    assert result["model"] == "toy_flex_patch" and result["inference"]["images_per_s"]["median"] > 0
    printed = capsys.readouterr().out
    assert "toy_flex_patch" in printed and "img/s median [min-max]" in printed
