"""convert across processes (spec §7.4): --workers on this host and Ray tasks on a (local,
loopback) cluster write the bytes a single process writes, for every target, also when one
shard is shared among workers; a worker killed mid-piece is replaced and its piece redone."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import FIXTURES, ROOT, cli_in_process, tree_snapshot
from ctformat.convert import convert
from ctformat.errors import UsageError
from test_convert import big_checkpoint

# (fixture, target, options); each also runs with pieces small enough to share one shard
CASES = [("tiny-mixtral", "dense", {"max_shard_size": 300_000}),
         ("int4-g32-actorder", "dense", {"dtype": "float16"}),
         ("tiny-mixtral-g64", "marlin", {"stack_experts": True}),
         ("marlin-back", "compressed-tensors", {})]


def _options(options):
    import torch
    return {k: (getattr(torch, v) if k == "dtype" else v) for k, v in options.items()}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Each case's input, and its output written by one process (the reference bytes)."""
    root = tmp_path_factory.mktemp("parallel")
    convert(FIXTURES / "tiny-mixtral-g64", root / "marlin-back", to="marlin", device="cpu")
    big = big_checkpoint(root / "big")
    out = {}
    for k, (name, target, options) in enumerate(CASES):
        src = root / name if name == "marlin-back" else FIXTURES / name
        convert(src, root / f"ref-{k}", to=target, device="cpu", **_options(options))
        out[k] = (src, tree_snapshot(root / f"ref-{k}"))
    convert(big, root / "ref-big", to="dense", device="cpu", max_shard_size=20_000_000)
    return out, big, tree_snapshot(root / "ref-big")


def test_workers_write_the_bytes_of_one_process(sources, tmp_path):
    cases, big, big_ref = sources
    for k, (name, target, options) in enumerate(CASES):
        out = tmp_path / f"o-{k}"
        r = convert(cases[k][0], out, to=target, device="cpu", workers=2, piece_size=20_000, **_options(options))
        assert r.details["workers"] == 2 and r.details["pieces"] > 1, (name, r.details)
        assert tree_snapshot(out) == cases[k][1], (name, target)
    r = convert(big, tmp_path / "big", to="dense", devices="cpu,cpu", max_shard_size=20_000_000)
    assert r.details["pieces"] == 12 and r.device == "2 workers on cpu"
    assert tree_snapshot(tmp_path / "big") == big_ref


def _children(pid: int) -> list[tuple[int, bytes]]:
    found = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
                cmd = (p / "cmdline").read_bytes()
            except (OSError, IndexError, ValueError):
                continue
            if ppid == pid:
                found.append((int(p.name), cmd))
    return found


def _workers(driver: int) -> list[int]:
    """Worker processes of a driver: the children of its multiprocessing fork server."""
    return [w for server, cmd in _children(driver) if b"forkserver" in cmd for w, _ in _children(server)]


def test_a_worker_killed_mid_piece_is_replaced(sources, tmp_path):
    _, big, big_ref = sources
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "ctformat", "convert", str(big), str(out), "--to", "dense",
                             "--device", "cpu", "--max-shard-size", "20MB", "--workers", "2", "--json"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline, killed = time.monotonic() + 120, None
    while killed is None and proc.poll() is None and time.monotonic() < deadline:
        records = list(tmp_path.glob(".out.tmp-*/.ctformat-resume/piece-*.json"))
        workers = _workers(proc.pid)
        if records and workers:
            killed = workers[0]
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.01)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert killed is not None, "the run ended before a worker could be killed"
    doc = json.loads(stdout)
    assert doc["workers_lost"] == 1 and doc["pieces_redone"] <= 1
    assert tree_snapshot(out) == big_ref


def test_driver_killed_leaves_a_folder_resume_completes(sources, tmp_path):
    """SIGKILL the driver: its workers end too (nothing writes into the folder afterwards), and
    --resume (here with one process) keeps what the workers recorded and finishes the output."""
    _, big, big_ref = sources
    out = tmp_path / "out"
    args = [str(big), str(out), "--to", "dense", "--device", "cpu", "--max-shard-size", "20MB"]
    proc = subprocess.Popen([sys.executable, "-m", "ctformat", "convert", *args, "--workers", "2"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, workers = time.monotonic() + 120, []
    while proc.poll() is None and time.monotonic() < deadline:
        workers = workers or _workers(proc.pid)
        if list(tmp_path.glob(".out.tmp-*/.ctformat-resume/piece-*.json")):
            break
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    assert workers and not out.exists(), "the run ended before the driver could be killed"
    deadline = time.monotonic() + 30
    while any(Path(f"/proc/{w}").exists() and b"forkserver" in Path(f"/proc/{w}/cmdline").read_bytes()
              for w in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert time.monotonic() < deadline, "workers outlived their driver"
    done = len(list(tmp_path.glob(".out.tmp-*/.ctformat-resume/piece-*.json")))
    r = subprocess.run([sys.executable, "-m", "ctformat", "convert", *args, "--resume", "--json"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["pieces_resumed"] == done >= 1
    assert tree_snapshot(out) == big_ref


def test_ray_missing_or_misused_is_one_line(tmp_path):
    code = ("import sys; sys.modules['ray'] = None; from ctformat_cli.main import main; "
            f"main(['convert', {str(FIXTURES / 'int4-g32')!r}, {str(tmp_path / 'o')!r}, '--to', 'dense', '--ray', 'local'])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 1 and r.stderr.strip() == ("Error: ray is not installed; conversions on a Ray cluster "
                                                      "(convert --ray) need it: pip install 'ctformat[ray]'")
    assert not list(tmp_path.iterdir())
    r = subprocess.run([sys.executable, "-m", "ctformat", "convert", str(FIXTURES / "int4-g32"), str(tmp_path / "o"),
                        "--to", "dense", "--ray", "local", "--workers", "2"], capture_output=True, text=True,
                       cwd=ROOT, timeout=120)
    assert r.returncode == 2 and "--ray schedules its own workers" in r.stderr
    if not torch_cuda():
        r = cli_in_process("convert", FIXTURES / "int4-g32", tmp_path / "o", "--to", "dense", "--devices", "all")
        assert r.returncode == 1 and r.stderr.startswith("Error: --devices all: no CUDA device here")
    r = cli_in_process("convert", FIXTURES / "int4-g32", tmp_path / "o", "--to", "dense", "--devices", "cpu",
                       "--device", "cpu")
    assert r.returncode == 2 and "leave out --device" in r.stderr
    assert not list(tmp_path.iterdir())


def torch_cuda() -> bool:
    import torch
    return torch.cuda.is_available()


# -- Ray: one local cluster (loopback, 2 CPUs) for the tests below -------------------------------
class _Deadline:
    """SIGALRM after `seconds`: a hung Ray start or task fails the test instead of the CI run."""

    def __init__(self, seconds: int) -> None:
        self.seconds = seconds

    def __enter__(self):
        def late(signum, frame):
            raise TimeoutError(f"Ray ran past {self.seconds} s")
        self.old = signal.signal(signal.SIGALRM, late)
        signal.alarm(self.seconds)

    def __exit__(self, *exc):
        signal.alarm(0)
        signal.signal(signal.SIGALRM, self.old)


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    with _Deadline(180):
        ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
                 log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def bounded():
    with _Deadline(300):
        yield


def test_ray_tasks_write_the_bytes_of_one_process(ray_cluster, sources, tmp_path, bounded):
    cases, big, big_ref = sources
    for k in (0, 2, 3):
        name, target, options = CASES[k]
        out = tmp_path / f"o-{k}"
        r = convert(cases[k][0], out, to=target, device="cpu", ray="local", piece_size=20_000, **_options(options))
        assert r.details["workers"] == 2 and r.details["pieces"] > 1 and r.details["ray_gpu"] is False
        assert tree_snapshot(out) == cases[k][1], (name, target)
    convert(big, tmp_path / "big", to="dense", device="cpu", ray="local", max_shard_size=20_000_000)
    assert tree_snapshot(tmp_path / "big") == big_ref


def _ray_task_pids() -> list[int]:
    """Ray workers running a conversion task: Ray titles them ray::ray_task while they do."""
    found = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if (p / "cmdline").read_bytes().startswith(b"ray::ray_task"):
                    found.append(int(p.name))
            except OSError:
                continue
    return found


def test_ray_task_killed_mid_piece_is_retried(ray_cluster, sources, tmp_path, bounded):
    _, big, big_ref = sources
    killed, stop = [], threading.Event()

    def killer():
        while not stop.is_set() and not killed:
            pids = _ray_task_pids()
            if pids and list(tmp_path.glob(".out.tmp-*/.ctformat-resume/piece-*.json")):
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])
            time.sleep(0.01)
    t = threading.Thread(target=killer, daemon=True)
    t.start()
    try:
        convert(big, tmp_path / "out", to="dense", device="cpu", ray="local", max_shard_size=20_000_000)
    finally:
        stop.set()
        t.join()
    assert killed, "the run ended before a task could be killed"
    assert tree_snapshot(tmp_path / "out") == big_ref


def test_gguf_output_is_not_split_into_pieces_yet(tmp_path):
    """GGUF's writer lays out its own bytes: asking to resume or spread it is a usage error."""
    for how in ({"resume": True}, {"workers": 2}, {"ray": "local"}):
        with pytest.raises(UsageError, match="in one process"):
            convert(FIXTURES / "int4-g32", tmp_path / "o.gguf", to="gguf", **how)
    assert not list(tmp_path.iterdir())
