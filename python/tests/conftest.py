"""Shared helpers: where the golden vectors are and how to read them."""

import os
import pathlib

import numpy as np
import pytest
from safetensors.numpy import load_file

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
GOLDEN_DIR = pathlib.Path(
    os.environ.get("LORAFUSE_GOLDEN_DIR", str(REPO_ROOT / "tests" / "golden"))
)


def golden_files(prefix):
    """The golden files `<prefix>_*.safetensors`, sorted (empty if the dir is missing)."""
    if not GOLDEN_DIR.is_dir():
        return []
    return sorted(GOLDEN_DIR.glob(f"{prefix}_*.safetensors"))


def load(path):
    """All tensors of a golden file as C-contiguous numpy arrays, printing its name."""
    print(f"golden: {path.name}")
    return {k: np.ascontiguousarray(v) for k, v in load_file(str(path)).items()}


def params(prefix):
    """pytest parameters over the golden files with `prefix`, named by file."""
    files = golden_files(prefix)
    if not files:
        return [pytest.param(None, marks=pytest.mark.skip(f"no {prefix}_* in {GOLDEN_DIR}"))]
    return [pytest.param(f, id=f.stem) for f in files]


def close(actual, expected, atol, rtol=1e-5, name=""):
    assert actual.dtype == np.float32, name
    assert actual.shape == expected.shape, (name, actual.shape, expected.shape)
    err = float(np.max(np.abs(actual.astype(np.float64) - expected)))
    print(f"  {name}: max abs err {err:.3g}")
    np.testing.assert_allclose(actual, expected, atol=atol, rtol=rtol, err_msg=name)


def _resource(reason):
    """The LORAFUSE_REQUIRE name a skip reason is about (for scripts/test.sh's summary)."""
    if "torch" in reason:
        return "torch"
    if "LORAFUSE_MODEL" in reason:
        return "model"
    return "python"


def _log_skip(nodeid, longrepr):
    log = os.environ.get("LORAFUSE_SKIP_LOG")
    if not log:
        return
    reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    reason = " ".join(str(reason).split())
    with open(log, "a", encoding="utf-8") as f:
        f.write(f"{_resource(reason)}\t{nodeid}: {reason}\n")


def pytest_runtest_logreport(report):
    """Appends every skipped test to $LORAFUSE_SKIP_LOG (one `resource<TAB>reason` line)."""
    if report.skipped and report.when in ("setup", "call"):
        _log_skip(report.nodeid, report.longrepr)


def pytest_collectreport(report):
    """Module-level skips (e.g. test_torch.py without torch) happen at collection."""
    if report.skipped:
        _log_skip(report.nodeid, report.longrepr)
