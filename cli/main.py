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
@click.option("--target", type=click.Choice(["vllm"]), default=None,
              help="Also warn about what this engine refuses (vllm: vLLM 0.33), quoting its messages.")
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
        render.err.print(f"[red]Error:[/] {e}", markup=True, highlight=False)
        sys.exit(e.exit_code)
    except (OSError, MemoryError) as e:
        if debug:
            raise
        render.err.print(f"[red]Error:[/] {e}")
        sys.exit(1)
    except Exception as e:  # a bug: say so, keep the traceback behind --debug
        if debug:
            raise
        render.err.print(f"[red]Internal error:[/] {type(e).__name__}: {e} (rerun with --debug for the traceback)")
        sys.exit(3)


if __name__ == "__main__":
    main()
