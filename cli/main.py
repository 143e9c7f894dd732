"""`ctformat` entry point. Exit codes: 0 success (warnings allowed), 1 errors found or a
ctformat error, 2 usage error, 3 internal error (a bug: please report it with --debug)."""
from __future__ import annotations

import os
import sys

import click

from . import render

EXIT_CODES = """\b
Exit codes:
  0  success (validate: no errors; warnings allowed)
  1  errors found in the checkpoint, or it could not be read
  2  usage error (bad option or argument)
  3  internal error (a bug; rerun with --debug and report it)"""


@click.group(epilog=EXIT_CODES, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, envvar="CTFORMAT_DEBUG", help="Show full tracebacks.")
@click.version_option(package_name="ctformat")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Inspect, validate and convert compressed-tensors quantized checkpoints.

    MODEL is a checkpoint folder (config.json + safetensors shards), one .safetensors file,
    or a Hugging Face Hub repo id (org/name; only config, index and headers are fetched).
    """
    ctx.obj = {"debug": debug}


REVISION = click.option("--revision", default=None, help="Hub revision (branch, tag or commit) for a repo id MODEL.")


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
    from ctformat.hub import open_model
    from ctformat.summary import summarize, tensor_rows
    ckpt = open_model(model, revision)
    doc = summarize(ckpt).data
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
    from ctformat.validate import validate_checkpoint
    progress = None
    if deep and not as_json and render.err.is_terminal:
        progress = _progress("checking tensor data")
    report = validate_checkpoint(model, deep=deep, revision=revision, target=target, progress=progress).to_json()
    render.emit_json(report) if as_json else render.report(report)
    sys.exit(0 if report["ok"] else 1)


def _size(text: str) -> int:
    """'5GB' -> 5_000_000_000, '512MiB' -> 536_870_912, '1000' -> 1000."""
    import re
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKMGT]?)(i?)B?\s*", text)
    if not m:
        raise click.BadParameter(f"{text!r} is not a size like 5GB or 500MiB")
    power = " kMGT".index(m.group(2).replace("K", "k") or " ")
    return int(float(m.group(1)) * (1024 if m.group(3) else 1000) ** power)


@cli.command(epilog=EXIT_CODES)
@click.argument("model", type=click.Path(path_type=str))
@click.argument("out", type=click.Path(path_type=str))
@click.option("--to", "target", type=click.Choice(["dense", "marlin", "compressed-tensors"]), required=True,
              help="Output layout: dense weights, vLLM's Marlin layout, or back from Marlin to pack-quantized.")
@click.option("--dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default="bfloat16",
              show_default=True, help="--to dense: dtype of the weights (computed in the scale dtype, then cast).")
@click.option("--scale-dtype", type=click.Choice(["float16", "bfloat16"]), default=None,
              help="--to marlin: scale dtype (default: as stored); refused if any scale changes value.")
@click.option("--allow-lossy-scales", is_flag=True, help="--to marlin: accept a --scale-dtype that rounds scales.")
@click.option("--stack-experts", is_flag=True,
              help="--to marlin: store each MoE layer's experts stacked (w13 = gate+up, w2), as vLLM's fused MoE holds them.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--max-shard-size", default="5GB", show_default=True, help="Largest output shard (5GB, 500MiB...).")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--keep-names", is_flag=True, help="--to dense: keep expert names as on disk (no Mixtral w1/w2/w3 renaming).")
@click.option("--json", "as_json", is_flag=True, help="Print what was done as JSON.")
def convert(model: str, out: str, target: str, dtype: str, scale_dtype: str | None, allow_lossy_scales: bool,
            stack_experts: bool, device: str, max_shard_size: str, force: bool, keep_names: bool, as_json: bool) -> None:
    """Convert a checkpoint to another layout; OUT appears only when complete.

    \b
    --to dense: every quantized module M becomes M.weight; all other tensors and files are
      copied; quantization_config is removed from config.json.
    --to marlin: every quantized module M becomes M.B, M.s (M.zp, M.g_idx, M.perm) in vLLM
      0.33's Marlin layout (spec §10); unsupported modules are refused before writing.
    --to compressed-tensors: a Marlin checkpoint back to its pack-quantized source, bit for bit.

    Example: ctformat convert fixtures/tiny-mixtral /tmp/tiny-dense --to dense
    """
    import time

    import torch

    from ctformat.convert import DTYPES, convert_to_ct, convert_to_dense, convert_to_marlin
    from ctformat.errors import UsageError
    if target != "marlin" and (scale_dtype or allow_lossy_scales or stack_experts):
        raise UsageError("--scale-dtype, --allow-lossy-scales and --stack-experts go with --to marlin")
    if target != "dense" and (keep_names or dtype != "bfloat16"):
        raise UsageError("--dtype and --keep-names go with --to dense")
    limit = _size(max_shard_size)
    t0 = time.perf_counter()
    common = dict(device=device, max_shard_size=limit, force=force)
    with _bytes_progress(f"convert → {target}", disable=as_json) as progress:
        if target == "dense":
            stats = convert_to_dense(model, out, dtype=DTYPES[dtype], keep_names=keep_names, progress=progress, **common)
        elif target == "marlin":
            stats = convert_to_marlin(model, out, scale_dtype=getattr(torch, scale_dtype) if scale_dtype else None,
                                      allow_lossy_scales=allow_lossy_scales, stack_experts=stack_experts,
                                      progress=progress, **common)
        else:
            stats = convert_to_ct(model, out, progress=progress, **common)
    stats["seconds"] = round(time.perf_counter() - t0, 3)
    if as_json:
        render.emit_json(stats)
        return
    done = {"modules_dequantized": "dequantized", "modules_repacked": "repacked", "modules_restored": "restored"}
    key = next(k for k in done if k in stats)
    render.out.print(f"wrote {out}: {stats[key]} modules {done[key]}, "
                     f"{stats['tensors_copied']} tensors copied, {render.size(stats['bytes_read'])} read in "
                     f"{stats['seconds']:.1f} s on {stats['device']}"
                     + (f" ({stats['cpu_fallbacks']} on the CPU after GPU out-of-memory)" if stats["cpu_fallbacks"] else "")
                     + (" (legacy Marlin format: quant_method gptq, checkpoint_format marlin)"
                        if stats.get("legacy_format") else ""))


class _bytes_progress:
    """A rich progress bar on stderr (bytes, speed, ETA), as a progress(done, total) callback."""

    def __init__(self, label: str, disable: bool) -> None:
        from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                                   TransferSpeedColumn)
        self.bar = Progress(TextColumn(label), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                            TimeRemainingColumn(), console=render.err, disable=disable or not render.err.is_terminal)
        self.task = self.bar.add_task(label, total=None)

    def __enter__(self):
        self.bar.start()
        return lambda done, total: self.bar.update(self.task, completed=done, total=total)

    def __exit__(self, *exc) -> None:
        self.bar.stop()


def _progress(label: str):
    from rich.progress import Progress
    bar = Progress(console=render.err, transient=True)
    task = bar.add_task(label, total=None)
    bar.start()

    def update(done: int, total: int) -> None:
        bar.update(task, completed=done, total=total)
        if done == total:
            bar.stop()
    return update


def main(argv: list[str] | None = None) -> None:
    from rich.markup import escape

    from ctformat.errors import CtFormatError
    debug = "--debug" in (argv if argv is not None else sys.argv[1:]) or bool(os.environ.get("CTFORMAT_DEBUG"))
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
    except CtFormatError as e:
        if debug:
            raise
        render.err.print(f"[red]Error:[/] {escape(str(e))}", markup=True, highlight=False)
        sys.exit(e.exit_code)
    except (OSError, MemoryError) as e:
        if debug:
            raise
        render.err.print(f"[red]Error:[/] {escape(str(e))}")
        sys.exit(1)
    except Exception as e:  # a bug: say so, keep the traceback behind --debug
        if debug:
            raise
        render.err.print(f"[red]Internal error:[/] {type(e).__name__}: {escape(str(e))} (rerun with --debug for the traceback)")
        sys.exit(3)


from .infer_cmds import compare, run  # noqa: E402  (they use EXIT_CODES above)

cli.add_command(run)
cli.add_command(compare)


if __name__ == "__main__":
    main()
