"""Test helpers: the parity fixtures in ../shared/fixtures and the tolerance they define."""

from __future__ import annotations

import json
import os
import pathlib

import numpy as np

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = pathlib.Path(os.environ.get("FLEXVISION_FIXTURES", REPO_ROOT.parent / "shared" / "fixtures"))


def load_fixture(relpath: str) -> tuple[dict[str, np.ndarray], dict]:
    """Reads ``FIXTURES/relpath``: every array upcast to float32 (float16 storage is exact), and meta."""
    path = FIXTURES / relpath
    if not path.exists():
        raise FileNotFoundError(
            f"parity fixture {path} is missing: the tests expect ../shared/fixtures beside the "
            f"repository (or FLEXVISION_FIXTURES pointing at it)")
    with np.load(path) as npz:
        meta = json.loads(str(npz["meta"]))
        arrays = {k: (npz[k].astype(np.float32) if npz[k].dtype.kind == "f" else npz[k])
                  for k in npz.files if k != "meta"}
    return arrays, meta


def state_dict_of(arrays: dict[str, np.ndarray], prefix: str = "state/") -> dict[str, np.ndarray]:
    """The reference state dict stored under ``prefix`` in a fixture, names without the prefix."""
    return {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}


def parity_error(ours, ref) -> tuple[float, float]:
    """(max |ours - ref|, allowed) with allowed = 1e-4 * max(1, max |ref|) (fixtures/README.md)."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, f"shape {ours.shape} != reference {ref.shape}"
    return float(np.max(np.abs(ours - ref))), 1e-4 * max(1.0, float(np.max(np.abs(ref))))


def assert_parity(ours, ref, what: str = "") -> None:
    """Asserts the fixtures' tolerance: max |ours - ref| <= 1e-4 * max(1, max |ref|)."""
    err, allowed = parity_error(ours, ref)
    assert err <= allowed, f"{what}: max |ours - ref| = {err:.3g} > allowed {allowed:.3g}"
