"""The detection benchmark runs end to end (tiny sizes) and reports every entry."""

from __future__ import annotations

import importlib.util
import json
import math

from tests.helpers import REPO_ROOT

try:
    from flexvision.benchmark import detection as bench
except ImportError:  # while flexvision/benchmark.py (a module) shadows the benchmark/ package
    _spec = importlib.util.spec_from_file_location(
        "flexvision_benchmark_detection", REPO_ROOT / "flexvision" / "benchmark" / "detection.py")
    bench = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(bench)


def test_detection_benchmark_quick(tmp_path, capsys):
    out = tmp_path / "det.json"
    report = bench.main(["--quick", "--repeats", "1", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    names = list(report["results"])
    for needed in ("roi_align", "nms", "postprocess_detections", "RoIHeads eval"):
        assert any(n.startswith(needed) for n in names), (needed, names)
    for timing in report["results"].values():
        assert math.isfinite(timing["median_ms"]) and timing["median_ms"] > 0
    assert "median ms" in capsys.readouterr().out
