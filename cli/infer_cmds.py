"""`ctformat run` and `ctformat compare`: reference inference through transformers (spec §11)."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from ctformat.errors import UsageError

from . import render
from .render import INFER_EXIT_CODES

_DTYPES = ("bfloat16", "float16", "float32")


def _common(f):
    f = click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")(f)
    f = click.option("--stream/--no-stream", default=None,
                     help="Materialize one decoder layer at a time on the device (default: when the dense "
                          "model would not fit in 70% of free GPU memory).")(f)
    f = click.option("--dtype", type=click.Choice(_DTYPES), default="bfloat16", show_default=True,
                     help="Dtype of the dense weights and the forward pass.")(f)
    f = click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")(f)
    f = click.option("--input-ids", "input_ids", default=None, metavar="IDS|FILE|-",
                     help="Token ids: inline (\"1 2 3\" or \"[1, 2, 3]\"), a file of them, or - for stdin; "
                          "a JSON list (or list of lists), or ids separated by spaces or commas.")(f)
    f = click.option("--text", default=None, help="Text, tokenized with the tokenizer in the (first) model folder.")(f)
    return f


def _ids(model: str, text: str | None, input_ids: str | None):
    from ctformat.inference import parse_input_ids, read_input_ids, tokenize
    if (text is None) == (input_ids is None):
        raise UsageError("give exactly one of --text and --input-ids")
    if text is not None:
        return tokenize(model, text)
    if input_ids == "-":
        return parse_input_ids(sys.stdin.read(), "stdin")
    if Path(input_ids).is_file():
        return read_input_ids(input_ids)
    return parse_input_ids(input_ids, f"--input-ids {input_ids!r} (no such file either)")


@click.command(epilog=INFER_EXIT_CODES)
@click.argument("model", type=click.Path(path_type=str))
@_common
@click.option("--top-k", default=5, show_default=True, type=click.IntRange(min=1), help="Next tokens to list.")
@click.option("--generate", default=0, show_default=True, type=click.IntRange(min=0),
              help="Also generate this many tokens greedily.")
def run(model: str, text: str | None, input_ids: str | None, device: str, dtype: str, stream: bool | None,
        as_json: bool, top_k: int, generate: int) -> None:
    """Run a checkpoint through transformers with ctformat's weights; print next-token probabilities.

    Example: ctformat run ../shared/real-checkpoints/llmcompressor-0.4.1/w4a16-gptq-g128 --text "Hello"
    """
    from ctformat.dtypes import float_dtype
    from ctformat.inference import run as run_model
    ids = _ids(model, text, input_ids)
    with render.ProgressBar("layers", unit="items", disable=as_json) as progress:
        doc = run_model(model, ids, top_k=top_k, generate=generate, device=device, dtype=float_dtype(dtype),
                        stream=stream, progress=progress)
    if as_json:
        render.emit_json(doc)
    else:
        render.run_result(doc)


@click.command(epilog=INFER_EXIT_CODES)
@click.argument("a", type=click.Path(path_type=str))
@click.argument("b", type=click.Path(path_type=str))
@_common
@click.option("--worst", default=10, show_default=True, type=click.IntRange(min=0),
              help="Modules with the largest weight error to list.")
def compare(a: str, b: str, text: str | None, input_ids: str | None, device: str, dtype: str,
            stream: bool | None, as_json: bool, worst: int) -> None:
    """Compare two checkpoints of one architecture: KL(A||B) of next-token distributions at every
    position, top-1 agreement, and ||W_A - W_B|| / ||W_B|| per module.

    Example: ctformat compare QUANTIZED DENSE --input-ids ids.json
    """
    from ctformat.dtypes import float_dtype
    from ctformat.inference import compare as compare_models
    ids = _ids(a, text, input_ids)
    with render.ProgressBar("layers", unit="items", disable=as_json) as progress:
        doc = compare_models(a, b, ids, device=device, dtype=float_dtype(dtype), stream=stream, worst=worst,
                             progress=progress)
    if as_json:
        render.emit_json(doc)
    else:
        render.compare_result(doc)
