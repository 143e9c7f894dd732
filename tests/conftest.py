from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

# huggingface_hub reads these at import time: keep every test hermetic (no telemetry, no
# token, a private cache), before any test module imports it.
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="ctformat-hf-home-")
os.environ.pop("HF_TOKEN", None)
os.environ.pop("HF_HUB_OFFLINE", None)

import torch  # noqa: E402

# Without a GPU, Triton kernels run in Triton's interpreter on the CPU (set before any import
# of triton): the kernel code itself is tested in CI, not only its torch twin.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fixtures"))   # make_fixtures' helpers
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "fixtures"
BAD = FIXTURES / "bad"
# Checkpoints written by llm-compressor itself: the vendored subset (fixtures/real, always
# there), plus the rest of the reference set beside the checkout when a developer has it.
REAL = FIXTURES / "real"
FORMATS = FIXTURES / "formats"          # one real checkpoint per compressed-tensors format
_MORE_REAL = ROOT.parent / "shared" / "real-checkpoints"
REAL_FOLDERS = sorted({p.relative_to(base).as_posix(): p for base in (_MORE_REAL, REAL) if base.is_dir()
                       for p in base.glob("*/*") if (p / "config.json").is_file()}.values(),
                      key=lambda p: (p.parent.name, p.name))
IN_CI = bool(os.environ.get("CI"))
GPU_SKIP = "needs a CUDA device"


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason=GPU_SKIP)
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


# In CI a skip means a peer or a fixture is missing, and the proof it stands for did not run:
# that is a failure there. Only GPU tests may skip (CI has no GPU; the device runs them).
@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_skip_in_ci(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _fail_skip_in_ci(outcome.get_result())


def _fail_skip_in_ci(report) -> None:
    if IN_CI and report.skipped:
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if GPU_SKIP not in reason:
            report.outcome = "failed"
            report.longrepr = f"skipped in CI, where every peer must be present: {reason}"


# compressed-tensors 0.14.0.1, the last release with the legacy sparse compressors, beside the
# system's 0.20: installed from PyPI into a cache folder once (CTFORMAT_CT014 names another).
CT014 = Path(os.environ.get("CTFORMAT_CT014") or Path.home() / ".cache" / "ctformat-tests" / "ct-0.14.0.1")


@pytest.fixture(scope="session")
def ct014() -> Path:
    """A folder to put on PYTHONPATH for compressed-tensors 0.14.0.1 (pure Python, no deps)."""
    import subprocess
    if not (CT014 / "compressed_tensors").is_dir():
        CT014.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=CT014.parent))
        run = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(tmp),
                              "compressed-tensors==0.14.0.1"], capture_output=True, text=True, timeout=600)
        if run.returncode:
            pytest.skip(f"compressed-tensors 0.14.0.1 could not be installed: {run.stderr[-300:]}")
        tmp.rename(CT014)
    return CT014


def tree_snapshot(path: Path) -> dict[str, bytes]:
    """Every file under path with its bytes: to prove something was not touched."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}
