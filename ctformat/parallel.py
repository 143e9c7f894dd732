"""One conversion across processes (spec §7.4): worker processes on this host (one per device
of `devices`, or `workers` on the CPU), or Ray tasks on a cluster. The driver owns the
temporary folder (staging.Staging); each worker rebuilds the same plan from (target, model,
options), checks it is the driver's, and writes the pieces it is handed into that folder at
their offsets, recording each once it is on disk. A worker that dies has its piece handed
out again; the driver publishes once every piece is recorded. The output is the bytes of a
single-process run, because every process writes the pieces of one ShardLayout.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any, Callable

from .errors import CtFormatError, ResumableError, UsageError
from .extras import require
from .pipeline import EXECUTION, Execution, Job, run_pieces
from .staging import Staging, write_record

__all__ = ["WorkerSpec", "parse_devices", "run_local", "run_ray", "RETRIES", "RAY_START_TIMEOUT"]

RETRIES = 2                 # a piece whose worker dies is handed out this many more times
RAY_START_TIMEOUT = 120     # seconds for `--ray local` to start its cluster
_NOTE = "{alive}/{n} workers"


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker needs to rebuild the driver's job: picklable, small. `entry(target, model,
    out, options)` is a module-level function that runs the target (convert.run_target)."""

    entry: Callable[[str, str, str, dict[str, Any]], Any]
    target: str
    model: str
    out: str
    options: dict[str, Any]               # the target function's keywords, progress left out
    key_options: dict[str, Any] | None    # Execution.options of the driver (part of the key)
    piece_size: int
    device: str = "cpu"
    threads: int = 0                      # torch threads (0: torch's default)
    tmp: str = ""
    key: str = ""
    ident: dict[str, Any] = field(default_factory=dict)


def parse_devices(text: str) -> list[str]:
    """--devices: "all" (every CUDA device here) or a comma list (cuda:0,cuda:1 or cpu,cpu)."""
    import torch
    if text.strip() == "all":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not n:
            raise CtFormatError("--devices all: no CUDA device here", option="device")
        return [f"cuda:{k}" for k in range(n)]
    devices = [d.strip() for d in text.split(",") if d.strip()]
    if not devices:
        raise UsageError(f"--devices {text!r}: name devices, e.g. cuda:0,cuda:1, or all")
    return devices


# -- inside a worker ------------------------------------------------------------------------
def plan_job(spec: WorkerSpec, work: Callable[[Job], Any]) -> None:
    """Run the target in this process with `work` in place of writing: the target opens and
    checks the input, plans, and hands the job to `work`, which must find the driver's plan."""
    def checked(job: Job) -> Any:
        if job.ident != spec.ident:
            raise CtFormatError(f"{spec.model}: this worker ({os.uname().nodename}, pid {os.getpid()}) reads a "
                                "different input or plans differently than the driver; every worker must see the "
                                "same files at the same path")
        return work(job)
    token = EXECUTION.set(Execution(worker=checked, options=spec.key_options, piece_size=spec.piece_size))
    try:
        spec.entry(spec.target, spec.model, spec.out, dict(spec.options, device=spec.device))
    finally:
        EXECUTION.reset(token)


def _set_device(spec: WorkerSpec) -> None:
    import torch
    if spec.threads:
        torch.set_num_threads(spec.threads)
    if spec.device.startswith("cuda:"):
        torch.cuda.set_device(int(spec.device.split(":")[1]))     # Triton launches on the current device


def worker_main(spec: WorkerSpec, conn) -> None:
    """A local worker: plan once, then write the pieces the driver sends until it sends None."""
    parent = mp.parent_process()
    if parent is not None:        # the driver's death ends the worker (its folder waits for --resume)
        threading.Thread(target=lambda: (wait([parent.sentinel]), os._exit(1)), daemon=True).start()

    def work(job: Job) -> Any:
        conn.send(("ready",))
        tmp = Path(spec.tmp)
        while (index := conn.recv()) is not None:
            read0 = job.result.bytes_read
            run_pieces(job, tmp, [index], lambda i, digest: write_record(tmp, spec.key, i, job.pieces[i], digest),
                       lambda n: conn.send(("bytes", n)))
            conn.send(("done", index, job.result.bytes_read - read0, _peak_rss()))
        return job.result               # the target function may add to it before returning
    try:
        _set_device(spec)
        plan_job(spec, work)
    except BaseException as exc:  # noqa: BLE001 - every failure goes to the driver, which raises it
        conn.send(("error", _portable(exc)))


def _portable(exc: BaseException) -> BaseException:
    """The exception itself when it pickles (every CtFormatError does), else its words."""
    import pickle
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001
        return RuntimeError(f"{type(exc).__name__}: {exc}")


# -- the driver, local processes ------------------------------------------------------------
def _context():
    """Workers are forked from a fork server that has imported ctformat (and torch) once, not
    spawned afresh: a replacement starts in milliseconds. The server touches no GPU, so each
    worker initializes CUDA itself."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["ctformat.convert"])
    return ctx


class _Slot:
    def __init__(self, ctx, spec: WorkerSpec) -> None:
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=worker_main, args=(spec, child), daemon=True, name="ctformat-worker")
        self.proc.start()
        child.close()
        self.piece: int | None = None
        self.bytes = 0                # of the current piece, for the bar
        self.ready = False
        self.starts = 0               # predecessors of this slot that died before they were ready


def run_local(job: Job, staging: Staging, *, spec: WorkerSpec, devices: list[str], workers: int,
              retries: int = RETRIES) -> dict[str, int]:
    """Write the pending pieces with `workers` processes (devices cycled), one piece at a time
    each; a worker that dies is replaced and its piece handed out again (up to `retries`
    more times). Returns counts for the result's details."""
    ctx = _context()
    threads = max(1, (os.cpu_count() or 1) // workers)
    specs = [replace(spec, device=devices[k % len(devices)], threads=threads, tmp=str(staging.tmp), key=staging.key,
                     ident=job.ident) for k in range(workers)]
    pending, tries, lost = deque(staging.pending), {}, 0
    bar = _Bar(job, staging)
    slots = [_Slot(ctx, s) for s in specs]
    try:
        while pending or any(s.piece is not None for s in slots):
            for s in slots:
                if s.ready and s.piece is None and pending:
                    s.piece, s.bytes = pending.popleft(), 0
                    s.conn.send(s.piece)
            bar.show(sum(s.bytes for s in slots), sum(s.proc.is_alive() for s in slots), len(slots))
            ready = wait([s.conn for s in slots] + [s.proc.sentinel for s in slots], timeout=0.5)
            for k, s in enumerate(slots):
                if s.conn not in ready and s.proc.sentinel not in ready:
                    continue
                try:
                    _message(s, s.conn.recv(), staging, bar)
                    continue
                except (EOFError, OSError):         # the worker is gone (killed, out of memory, ...)
                    pass
                lost += 1
                starts = 0 if s.ready else s.starts + 1     # deaths while planning, in a row
                if starts > retries:
                    raise ResumableError(f"workers died {starts} times before they were ready (exit code "
                                         f"{s.proc.exitcode})", file=str(staging.tmp), option="resume")
                if s.piece is not None:
                    tries[s.piece] = tries.get(s.piece, 0) + 1
                    if tries[s.piece] > retries:
                        raise ResumableError(f"piece {s.piece} ({job.pieces[s.piece].file}): its worker died "
                                             f"{tries[s.piece]} times (exit code {s.proc.exitcode})",
                                             file=str(staging.tmp), option="resume")
                    pending.appendleft(s.piece)
                s.proc.join(1)
                slots[k] = _Slot(ctx, specs[k])
                slots[k].starts = starts
    finally:
        _stop(slots)
    bar.show(0, 0, len(slots))
    return {"workers": workers, "workers_lost": lost, "pieces_redone": sum(tries.values()), "worker_peak_rss": bar.rss}


def _message(s: _Slot, msg: tuple, staging: Staging, bar: _Bar) -> None:
    """Handle one message of a worker (its failure is raised here)."""
    kind = msg[0]
    if kind == "ready":
        s.ready = True
    elif kind == "bytes":
        s.bytes += msg[1]
    elif kind == "done":
        staging.done.add(msg[1])              # the worker wrote its record
        bar.job.result.bytes_read += msg[2]
        bar.rss = max(bar.rss, msg[3])
        bar.finished(msg[1])
        s.piece, s.bytes = None, 0
    elif kind == "error":
        raise msg[1]


def _stop(slots: list[_Slot]) -> None:
    for s in slots:
        try:
            s.conn.send(None)
        except OSError:
            pass
    deadline = time.monotonic() + 10
    for s in slots:
        s.proc.join(max(0.0, deadline - time.monotonic()))
        if s.proc.is_alive():           # still inside a piece: the folder keeps what is recorded
            s.proc.kill()
            s.proc.join()
        s.conn.close()


class _Bar:
    """Bytes of finished pieces plus those in flight, on the driver's one progress bar."""

    def __init__(self, job: Job, staging: Staging) -> None:
        self.job = job
        self.total = sum(p.end - p.start for p in job.pieces)
        self.done = self.total - sum(job.pieces[i].end - job.pieces[i].start for i in staging.pending)
        self.rss = 0                  # the largest peak resident memory a worker reported, bytes

    def finished(self, index: int) -> None:
        p = self.job.pieces[index]
        self.done += p.end - p.start

    def show(self, in_flight: int, alive: int, n: int) -> None:
        if self.job.progress:
            self.job.progress(min(self.done + in_flight, self.total), self.total, _NOTE.format(alive=alive, n=n))


# -- the driver, Ray ------------------------------------------------------------------------
def _import_ray():
    require("ray")
    import ray
    return ray


def _connect(ray, address: str) -> bool:
    """Join the cluster at `address`, or start a local one ("local": loopback only, within
    RAY_START_TIMEOUT seconds). True when this call started Ray (and must stop it)."""
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = dict(log_to_driver=False, configure_logging=False)
    if address == "local":
        kwargs.update(address="local", include_dashboard=False, _node_ip_address="127.0.0.1",
                      num_cpus=os.cpu_count())
    else:
        kwargs.update(address=address)
    bounded = threading.current_thread() is threading.main_thread()     # ray.init runs in the main thread only

    def late(signum, frame):
        raise TimeoutError(f"did not start within {RAY_START_TIMEOUT} s")
    old = signal.signal(signal.SIGALRM, late) if bounded else None
    if bounded:
        signal.alarm(RAY_START_TIMEOUT)
    try:
        ray.init(**kwargs)
    except Exception as exc:  # noqa: BLE001 - one line, whatever Ray raised
        raise CtFormatError(f"--ray {address}: the cluster {exc}") from None
    finally:
        if bounded:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old)
    return True


def ray_task(spec: WorkerSpec, index: int) -> tuple[int, int]:
    """One piece, in a Ray worker; the plan is built once per worker process and kept."""
    job = _JOBS.get(spec.key)
    if job is None:
        got: list[Job] = []
        _set_device(spec)
        plan_job(spec, lambda j: got.append(j) or j.result)
        job = _JOBS[spec.key] = got[0]
    read0 = job.result.bytes_read
    tmp = Path(spec.tmp)
    run_pieces(job, tmp, [index], lambda i, digest: write_record(tmp, spec.key, i, job.pieces[i], digest))
    return index, job.result.bytes_read - read0, _peak_rss()


def _peak_rss() -> int:
    """This process's peak resident memory in bytes (Linux reports KiB)."""
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


_JOBS: dict[str, Job] = {}


def run_ray(job: Job, staging: Staging, *, spec: WorkerSpec, address: str, gpu: bool | None,
            retries: int = RETRIES) -> dict[str, int]:
    """Write the pending pieces as Ray tasks (one CPU each, and one GPU when `gpu`; None: when
    the cluster has GPUs), at most as many in flight as the cluster has slots; a task whose
    worker dies is retried by Ray."""
    ray = _import_ray()
    started = _connect(ray, address)
    try:
        if gpu is None:
            gpu = ray.cluster_resources().get("GPU", 0) >= 1
        slots = max(1, int(ray.cluster_resources().get("GPU" if gpu else "CPU", 1)))
        spec = replace(spec, device="cuda" if gpu else "cpu", tmp=str(staging.tmp), key=staging.key, ident=job.ident)
        task = ray.remote(ray_task).options(num_cpus=1, num_gpus=1 if gpu else 0, max_retries=retries,
                                            retry_exceptions=False)
        pending, refs, bar = deque(staging.pending), {}, _Bar(job, staging)
        while pending or refs:
            while pending and len(refs) < slots:
                i = pending.popleft()
                refs[task.remote(spec, i)] = i
            bar.show(0, len(refs), slots)
            ready, _ = ray.wait(list(refs), num_returns=1, timeout=0.5)
            for ref in ready:
                refs.pop(ref)
                index, nbytes, rss = _ray_result(ray, ref, staging)
                staging.done.add(index)
                job.result.bytes_read += nbytes
                bar.finished(index)
                bar.rss = max(bar.rss, rss)
        return {"workers": slots, "ray_nodes": len([n for n in ray.nodes() if n.get("Alive")]), "ray_gpu": gpu,
                "worker_peak_rss": bar.rss}
    finally:
        if started:
            ray.shutdown()


def _ray_result(ray, ref, staging: Staging) -> tuple[int, int, int]:
    """A task's result, or its failure as ctformat's error (a refusal of the input as it is)."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as err:
        cause = err.cause if isinstance(err.cause, BaseException) else None
        raise (cause if isinstance(cause, CtFormatError) else
               RuntimeError(f"a Ray task failed: {cause or err}")) from None
    except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError, ray.exceptions.RayError) as err:
        raise ResumableError(f"Ray task lost after {RETRIES} retries: {type(err).__name__}", file=str(staging.tmp),
                             option="resume") from None
