"""`ctformat` entry point: the command group, inspect/validate/convert, and main(), which turns
an exception into one line and an exit code (render.EXIT_CODES)."""
from __future__ import annotations

import contextlib
import os
import re
import sys
import time

import click

from ctformat.checkpoint import paused_gc
from ctformat.errors import UsageError
from ctformat.source import open_model
from ctformat.summary import summarize, tensor_rows
from ctformat.validate import validate_checkpoint

from . import render
from .infer_cmds import compare, run
from .render import EXIT_CODES

REVISION = click.option("--revision", default=None, help="Hub revision (branch, tag or commit) for a repo id MODEL.")
DTYPE_NAMES = ("bfloat16", "float16", "float32")


@click.group(epilog=EXIT_CODES, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, envvar="CTFORMAT_DEBUG", help="Show full tracebacks.")
@click.version_option(package_name="ctformat")
def cli(debug: bool) -> None:
    """Inspect, validate and convert compressed-tensors quantized checkpoints.

    MODEL is a checkpoint folder (config.json + safetensors shards), one .safetensors file,
    or a Hugging Face Hub repo id (org/name; only config, index and headers are fetched).
    """
    _debug["on"] = debug      # read by main() once the command has raised


_debug = {"on": False}


@cli.command(epilog=EXIT_CODES)
@click.argument("model", type=click.Path(path_type=str))
@REVISION
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON (schema ctformat.inspect/1).")
@click.option("--tensors", "tensor_regex", is_flag=False, flag_value="", default=None, metavar="[REGEX]",
              help="Also list tensors (those whose name matches REGEX, if given).")
def inspect(model: str, revision: str | None, as_json: bool, tensor_regex: str | None) -> None:
    """Show what a checkpoint holds, from headers only (no tensor data is read).

    Example: ctformat inspect fixtures/tiny-mixtral --tensors 'layers\\.0\\..*q_proj'
    """
    with paused_gc():
        ckpt = open_model(model, revision)
        doc = summarize(ckpt)
        rows = tensor_rows(ckpt, tensor_regex or None) if tensor_regex is not None else None
    if as_json:
        render.emit_json(doc if rows is None else dict(doc, tensor_list=rows))
        return
    render.summary(doc)
    if rows is not None:
        render.tensors(rows)


@cli.command(epilog=EXIT_CODES)
@click.argument("model", type=click.Path(path_type=str))
@REVISION
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON (schema ctformat.validate/1).")
@click.option("--deep", is_flag=True, help="Also read tensor data: scales, zero points, g_idx, padding bits.")
@click.option("--target", type=click.Choice(["vllm", "transformers"]), default=None,
              help="Also warn about what this loader refuses or silently gets wrong (vllm: vLLM 0.33, "
                   "quoting its messages; transformers: expert names it does not read).")
def validate(model: str, revision: str | None, as_json: bool, deep: bool, target: str | None) -> None:
    """Check a checkpoint against every rule of the format spec (rule IDs in spec/ctformat.md).

    Example: ctformat validate fixtures/tiny-mixtral --deep
    """
    with render.ProgressBar("checking tensor data", unit="items", disable=as_json or not deep) as progress, \
            paused_gc(not deep):
        report = validate_checkpoint(model, deep=deep, revision=revision, target=target, progress=progress)
    doc = report.to_json()
    if as_json:
        render.emit_json(doc)
    else:
        render.report(doc)
    sys.exit(0 if report.ok else 1)


def _size(text: str) -> int:
    """'5GB' -> 5_000_000_000, '512MiB' -> 536_870_912, '1000' -> 1000."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKMGT]?)(i?)B?\s*", text)
    if not m:
        raise click.BadParameter(f"{text!r} is not a size like 5GB or 500MiB")
    power = " kMGT".index(m.group(2).replace("K", "k") or " ")
    return int(float(m.group(1)) * (1024 if m.group(3) else 1000) ** power)


# --to value -> the options that only it takes (name as the library spells it: its default)
_TARGET_OPTIONS = {
    "dense": {"dtype": "bfloat16", "keep_names": False, "drop_kv_cache": False, "originals": False},
    "marlin": {"scale_dtype": None, "allow_lossy_scales": False, "stack_experts": False},
    "gptq": {"gptq_format": None, "allow_lossy": False, "keep_names": False},
    "awq": {"allow_lossy": False, "keep_names": False},
    "compressed-tensors": {},
    "gguf": {"outtype": None, "allow_lossy": False, "int4_asym": None, "dequantize_unmappable": False,
             "tokenizer_pre": None, "split_max_size": None},
}


_MMAP_THRESHOLD = 1 << 20


def _fixed_mmap_threshold() -> None:
    """glibc serves a freed block's size from its heap from then on (the mmap threshold
    follows the largest freed block, up to 32 MiB), and a heap shared by the reader, compute
    and writer threads keeps freed tensors resident: converting Kimi-K2-sized experts held
    ~275 MiB over the floor instead of ~120 (benchmarks/bench_convert_memory.py). A fixed
    threshold maps every tensor and unmaps it when freed; worker processes inherit it."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return                                                    # the user's own, applied by glibc at start
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(_MMAP_THRESHOLD)
    if sys.platform.startswith("linux"):
        import ctypes
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None).mallopt(-3, _MMAP_THRESHOLD)       # M_MMAP_THRESHOLD; a no-op off glibc


@cli.command(epilog=EXIT_CODES)
@click.argument("model", type=click.Path(path_type=str))
@click.argument("out", type=click.Path(path_type=str))
@click.option("--to", "target", type=click.Choice(list(_TARGET_OPTIONS)), required=True,
              help="Output layout: dense weights, vLLM's Marlin layout, GPTQ, AWQ, back from Marlin, GPTQ or AWQ to "
                   "pack-quantized, or a llama.cpp GGUF file.")
@click.option("--dtype", type=click.Choice(DTYPE_NAMES), default="bfloat16",
              show_default=True, help="--to dense: dtype of the weights (computed in the scale dtype, then cast).")
@click.option("--scale-dtype", type=click.Choice(["float16", "bfloat16"]), default=None,
              help="--to marlin: scale dtype (default: as stored); refused if any scale changes value.")
@click.option("--allow-lossy-scales", is_flag=True, help="--to marlin: accept a --scale-dtype that rounds scales.")
@click.option("--stack-experts", is_flag=True,
              help="--to marlin: store each MoE layer's experts stacked (w13 = gate+up, w2), as vLLM's fused MoE holds them.")
@click.option("--outtype", type=click.Choice(["bf16", "f16", "f32"]), default=None,
              help="--to gguf: type of the float tensors (default bf16; norms and routers are F32).")
@click.option("--gptq-format", type=click.Choice(["v1", "v2"]), default=None,
              help="--to gptq: checkpoint_format gptq (v1, zero points stored minus one) or gptq_v2 "
                   "(default: v1 when every module is symmetric, else v2).")
@click.option("--allow-lossy", is_flag=True,
              help="--to gguf/gptq/awq: write scales fp16 cannot hold exactly as fp16(s), and report how many and by "
                   "how much.")
@click.option("--int4-asym", type=click.Choice(["q5_0", "q4_1"]), default=None,
              help="--to gguf: block type of asymmetric int4 (default q5_0, exact; q4_1 is smaller, exact for some zero points).")
@click.option("--dequantize-unmappable", is_flag=True,
              help="--to gguf: write modules no block type holds (group size 16, asym int8) as exact F32 instead of refusing.")
@click.option("--tokenizer-pre", default=None, metavar="NAME",
              help="--to gguf: llama.cpp's pre-tokenizer name for a BPE tokenizer ctformat does not recognize.")
@click.option("--split-max-size", default=None, metavar="SIZE",
              help="--to gguf: start a new shard before SIZE bytes of tensor data (50G, 500MiB...).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--max-shard-size", default="5GB", show_default=True, help="Largest output shard (5GB, 500MiB...).")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--resume", is_flag=True,
              help="Continue the temporary folder an interrupted run of the same source, target and options left.")
@click.option("--devices", default=None, metavar="LIST",
              help="One worker process per device: cuda:0,cuda:1,... or all (the CUDA devices of this host).")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Worker processes (on --device, or cycling over --devices); for CPU-only hosts.")
@click.option("--ray", "ray_address", default=None, metavar="ADDRESS",
              help="Run the pieces as Ray tasks on the cluster at ADDRESS (local: start one on this host). "
                   "MODEL and OUT must be on storage every node sees.")
@click.option("--keep-names", is_flag=True, help="--to dense/gptq/awq: keep MoE module names as on disk (no Mixtral "
              "renaming for transformers or GPTQModel).")
@click.option("--drop-kv-cache", is_flag=True,
              help="--to dense: drop kv-cache scales (k_scale, v_scale) and their kv_cache_scheme (default: kept).")
@click.option("--keep-originals", "originals", is_flag=True,
              help="--to dense, dense-format input: write the stored weights, not the ones its quantization gives.")
@click.option("--json", "as_json", is_flag=True, help="Print what was done as JSON.")
def convert(model: str, out: str, target: str, device: str, max_shard_size: str, force: bool, resume: bool,
            devices: str | None, workers: int | None, ray_address: str | None, as_json: bool, **options) -> None:
    """Convert a checkpoint to another layout; OUT appears only when complete.

    \b
    --to dense: every quantized module M becomes M.weight (any compressed-tensors format;
      online rotations folded in); activation scales and rotation matrices are read, not
      written; kv-cache scales are kept under a kv_cache_scheme-only quantization_config
      (--drop-kv-cache drops both); all other tensors and files are copied.
    --to marlin: every quantized module M becomes M.B, M.s (M.zp, M.g_idx, M.perm) in vLLM
      0.33's Marlin layout (spec §10); unsupported modules are refused before writing.
    --to gptq / --to awq: every quantized module M becomes M.qweight, M.qzeros, M.scales (and
      M.g_idx) as GPTQModel, transformers and vLLM read them (spec/gptq-awq.md); lossless,
      and what cannot be held is refused before writing.
    --to compressed-tensors: a Marlin, GPTQ or AWQ checkpoint back to pack-quantized (bit for
      bit when ctformat wrote it).
    --to gguf: one llama.cpp GGUF file (or a split set); quantized modules are repacked into
      ggml blocks (int4 -> Q4_0, int8 -> Q8_0, ...) with their own codes, never requantized;
      what cannot be written exactly is refused before writing (spec/gguf.md).

    \b
    An interrupted run (a kill, a full disk) keeps its temporary folder beside OUT; --resume
    continues it. --devices / --workers / --ray split the work; the output is the same bytes.

    Example: ctformat convert fixtures/tiny-mixtral /tmp/tiny-dense --to dense
    """
    from ctformat.convert import convert as run_convert
    from ctformat.dtypes import float_dtype
    _fixed_mmap_threshold()
    wanted = _TARGET_OPTIONS[target]
    stray = sorted(k for k, v in options.items() if k not in wanted and v not in (None, False, "bfloat16"))
    if stray:
        owners = [t for t, opts in _TARGET_OPTIONS.items() if stray[0] in opts]
        raise UsageError(f"--{stray[0].replace('_', '-')} goes with --to {' or '.join(owners)}")
    if devices is not None and device != "auto":
        raise UsageError("--devices names the devices itself; leave out --device")
    kwargs = {k: options[k] for k in wanted if options[k] is not None}
    for key in ("dtype", "scale_dtype"):
        if kwargs.get(key) is not None:
            kwargs[key] = float_dtype(kwargs[key])
    if target == "gguf":
        if click.get_current_context().get_parameter_source("max_shard_size") is not click.core.ParameterSource.DEFAULT:
            raise UsageError("--max-shard-size goes with safetensors output; --to gguf takes --split-max-size")
        if "split_max_size" in kwargs:
            kwargs["split_max_size"] = _size(kwargs["split_max_size"])
    else:
        kwargs["max_shard_size"] = _size(max_shard_size)
    t0 = time.perf_counter()
    with render.ProgressBar(f"convert → {target}", disable=as_json) as progress:
        result = run_convert(model, out, to=target, device=device, force=force, progress=progress, resume=resume,
                             devices=devices, workers=workers, ray=ray_address, **kwargs)
    seconds = round(time.perf_counter() - t0, 3)
    if as_json:
        render.emit_json(dict(result.to_json(), seconds=seconds))
    else:
        render.converted(result, seconds)


cli.add_command(run)
cli.add_command(compare)


def main(argv: list[str] | None = None) -> None:
    _debug["on"] = bool(os.environ.get("CTFORMAT_DEBUG"))
    try:
        cli.main(args=argv, prog_name="ctformat", standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.Abort:
        render.err.print("Aborted.")
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 - every failure ends as one line and an exit code
        if _debug["on"]:
            raise
        sys.exit(render.error(e))


if __name__ == "__main__":
    main()
