from __future__ import annotations

import contextlib
import io
import os
import subprocess
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
    if IN_CI:     # checks that need an environment CI cannot build in time: said, not silently skipped
        outside = [item for item in items if "outside_ci" in item.keywords]
        if outside:
            config.hook.pytest_deselected(items=outside)
            items[:] = [item for item in items if "outside_ci" not in item.keywords]
            config._ctformat_outside_ci = [item.nodeid for item in outside]


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    outside = getattr(config, "_ctformat_outside_ci", [])
    if outside:
        terminalreporter.write_line(f"{len(outside)} check(s) run outside CI by their own scripts (README, "
                                    f"'Checks outside CI'), not here: {', '.join(outside)}")


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


CACHE = Path(os.environ.get("CTFORMAT_TEST_CACHE") or Path.home() / ".cache" / "ctformat-tests")


def pip_target(name: str, requirements: list[str]) -> Path:
    """A folder holding exactly `requirements` (pinned, --no-deps, from the package index),
    installed once into the test cache: peers of another version than the environment's
    (transformers 4.x, compressed-tensors 0.14) run from it in a subprocess with PYTHONPATH."""
    target = CACHE / name
    done = target / ".installed"
    if not done.is_file() or done.read_text() != "\n".join(requirements):
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile", "--upgrade",
                        "--target", str(target), *requirements], check=True, timeout=600)
        done.write_text("\n".join(requirements))
    return target


def cli_in_process(*args: str) -> subprocess.CompletedProcess:
    """`ctformat ARGS` run in this process (no interpreter start-up, no torch import per call):
    exit code, stdout and stderr, as subprocess.run would give them. test_cli.py keeps the real
    `python -m ctformat` process for what only a process shows."""
    from ctformat_cli.main import main
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in args])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def cli(*args: str) -> tuple[int, str, str]:
    """cli_in_process as (exit code, stdout, stderr)."""
    r = cli_in_process(*args)
    return r.returncode, r.stdout, r.stderr


@pytest.fixture(scope="session")
def ct014() -> Path:
    """compressed-tensors 0.14.0.1, the last release with the legacy sparse compressors, to put
    on PYTHONPATH beside the system's 0.20 (pure Python, no deps)."""
    return pip_target("compressed-tensors-0.14.0.1", ["compressed-tensors==0.14.0.1"])


def tree_snapshot(path: Path) -> dict[str, bytes]:
    """Every file under path with its bytes: to prove something was not touched."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}
