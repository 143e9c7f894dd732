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
REAL = ROOT.parent / "shared" / "real-checkpoints"


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


def tree_snapshot(path: Path) -> dict[str, bytes]:
    """Every file under path with its bytes: to prove something was not touched."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}
