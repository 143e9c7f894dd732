"""`convert`: one entry point over the conversion targets, each a module of its own (spec §7,
§10). Every target streams through pipeline.run_steps and publishes its output atomically."""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Callable

from .errors import UsageError
from .parallel import WorkerSpec, parse_devices, run_local, run_ray
from .pipeline import EXECUTION, PIECE_SIZE, ConvertResult, Execution, Job, resolve_device
from .staging import Staging
from .to_dense import convert_to_dense, dense_plan, dequantize_checkpoint
from .to_gguf import convert_to_gguf
from .to_marlin import convert_to_ct, convert_to_marlin

__all__ = ["TARGETS", "convert", "convert_to_dense", "convert_to_marlin", "convert_to_ct", "convert_to_gguf",
           "dequantize_checkpoint",
           "dense_plan", "resolve_device", "ConvertResult"]

# --to value -> the function that writes it; each takes (model, out, **options)
TARGETS: dict[str, Callable[..., ConvertResult]] = {
    "dense": convert_to_dense,
    "marlin": convert_to_marlin,
    "compressed-tensors": convert_to_ct,
    "gguf": convert_to_gguf,
}


# keywords of every target function that say how to run, not what to write
_RUN_OPTIONS = ("device", "force", "progress")
# targets whose output goes through pipeline.run_conversion's pieces (resume, workers, Ray); the GGUF
# writer lays out its own bytes (gguf-py), spec §7.4
_PIECEWISE = ("dense", "marlin", "compressed-tensors")


def convert(model: str | Path, out: str | Path, *, to: str, resume: bool = False, workers: int | None = None,
            devices: str | list[str] | None = None, ray: str | None = None, piece_size: int = PIECE_SIZE,
            **options: Any) -> ConvertResult:
    """Convert MODEL to the layout `to` at OUT; options are the target function's keywords.

    How it runs changes no output byte (spec §1.7, §7.4): `resume` continues the temporary
    folder an interrupted run of the same source, target and options left; `devices` (a list,
    a comma list or "all") runs one worker process per device, `workers` N processes (devices
    cycled; on `device` when no devices are named); `ray` (an address, or "local") runs the
    pieces as tasks on a Ray cluster whose nodes all see MODEL and OUT at the same paths.
    `piece_size` is the resumable unit (bytes; part of the temporary folder's key)."""
    if to not in TARGETS:
        raise ValueError(f"unknown target {to!r}; known: {', '.join(TARGETS)}")
    if to not in _PIECEWISE and (resume or workers or devices or ray):
        raise UsageError(f"--to {to} writes its file in one process: --resume, --workers, --devices and --ray "
                         f"go with {', '.join(_PIECEWISE)}")
    bound = inspect.signature(TARGETS[to]).bind(model, out, **options)
    bound.apply_defaults()          # an option given as its default is the same option
    key_options = {k: v for k, v in list(bound.arguments.items())[2:] if k not in (*_RUN_OPTIONS, "max_shard_size")}
    runner = _runner(to, model, out, options, key_options, workers, devices, ray, piece_size)
    token = EXECUTION.set(Execution(resume=resume, runner=runner, options=key_options, piece_size=piece_size))
    try:
        if runner is not None:        # the workers compute; the driver only plans and publishes
            options = dict(options, device="cpu")
        result = TARGETS[to](model, out, **options)
    finally:
        EXECUTION.reset(token)
    if runner is not None:
        result.device = runner.where
        result.details.update(runner.counts)
    return result


def run_target(to: str, model: str, out: str, options: dict[str, Any]) -> Any:
    """A worker's entry: the target function as the driver called it (WorkerSpec.entry)."""
    return TARGETS[to](model, out, **options)


class _Runner:
    """Execution.runner for workers or Ray; keeps what it counted for the result."""

    def __init__(self, run: Callable[..., dict[str, int]], where: str, **kwargs: Any) -> None:
        self.run, self.where, self.kwargs, self.counts = run, where, kwargs, {}

    def __call__(self, job: Job, staging: Staging) -> None:
        self.counts = {"pieces": len(job.pieces), **self.run(job, staging, **self.kwargs)}


def _runner(to: str, model, out, options: dict[str, Any], key_options: dict[str, Any], workers: int | None,
            devices: str | list[str] | None, ray: str | None, piece_size: int) -> _Runner | None:
    if ray is not None and (workers or devices):
        raise UsageError("--ray schedules its own workers; it takes no --workers or --devices")
    if workers is not None and workers < 1:
        raise UsageError(f"--workers {workers}: give 1 or more")
    device = options.get("device", "auto")
    spec = WorkerSpec(run_target, to, str(model), str(out),
                      {k: v for k, v in options.items() if k != "progress"}, key_options, piece_size)
    if ray is not None:
        gpu = None if device == "auto" else resolve_device(device).type == "cuda"
        return _Runner(run_ray, f"ray {ray}", spec=spec, address=ray, gpu=gpu)
    if devices is None and workers is None:
        return None
    names = parse_devices(devices) if isinstance(devices, str) else list(devices or [device])
    names = [str(resolve_device(d)) for d in names]
    n = workers or len(names)
    return _Runner(run_local, f"{n} workers on {', '.join(dict.fromkeys(names))}", spec=spec, devices=names,
                   workers=n)

