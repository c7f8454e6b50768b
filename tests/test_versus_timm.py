"""The side-by-side script (flexvision.benchmark.versus_timm) without torch: flexvision alone,
the timm columns say 'not run', the JSON holds the figures."""

from __future__ import annotations

import json

from flexvision.benchmark import versus_timm


def test_workloads_per_backend():
    assert {c.phase for c in versus_timm.workloads_for("gpu")} == {"train", "inference"}
    assert all(c.dtype == "bfloat16" for c in versus_timm.workloads_for("gpu"))
    assert all(c.dtype == "float32" for c in versus_timm.workloads_for("cpu"))
    assert all(c.batch_size == 2 for c in versus_timm.workloads_for("gpu", quick=True))


def test_without_torch_flexvision_runs_alone_and_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(versus_timm, "torch_available", lambda: (False, "torch/timm not installed"))
    tiny = (versus_timm.Comparison("micro", "vit_micro", "vit_micro", "inference", 2, "float32",
                                   32),)
    monkeypatch.setattr(versus_timm, "workloads_for", lambda backend, quick=False: tiny)
    path = tmp_path / "out.json"
    assert versus_timm.main(["--json", str(path), "--repeats", "1", "--min_time", "0"]) == 0
    printed = capsys.readouterr().out
    assert "flexvision only" in printed and "not run" in printed
    result = json.loads(path.read_text())
    assert result["timm_measured"] is False
    (row,) = result["rows"]
    assert "timm_eager" not in row and row["flexvision"]["images_per_s"] > 0
    assert row["flexvision"]["flop_counts"]["lowered"] > 0
    assert row["flexvision"]["attention"] == ["xla"]


def test_torch_is_not_a_dependency():
    with open("setup.py") as f:
        assert "torch" not in f.read()
    available, note = versus_timm.torch_available()
    assert available or "not installed" in note
