"""`ctformat run` and `ctformat compare`: reference inference through transformers (spec §11)."""
from __future__ import annotations

import click

from . import render
from .main import EXIT_CODES

INFER_EXIT_CODES = EXIT_CODES + """
  (run, compare: 1 also for an architecture transformers does not know, or weights it
  would not read; 2 also for --text without a tokenizer, token ids out of range, and
  compare of two different architectures)"""

_DTYPES = ("bfloat16", "float16", "float32")


def _common(f):
    f = click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")(f)
    f = click.option("--stream/--no-stream", default=None,
                     help="Materialize one decoder layer at a time on the device (default: when the dense "
                          "model would not fit in 70% of free GPU memory).")(f)
    f = click.option("--dtype", type=click.Choice(_DTYPES), default="bfloat16", show_default=True,
                     help="Dtype of the dense weights and the forward pass.")(f)
    f = click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")(f)
    f = click.option("--input-ids", "input_ids", type=click.Path(exists=True, dir_okay=False), default=None,
                     help="File of token ids: a JSON list (or list of lists), or ids separated by spaces.")(f)
    f = click.option("--text", default=None, help="Text, tokenized with the tokenizer in the (first) model folder.")(f)
    return f


def _ids(model: str, text: str | None, input_ids: str | None):
    from ctformat.errors import UsageError
    from ctformat.inference import read_input_ids, tokenize
    if (text is None) == (input_ids is None):
        raise UsageError("give exactly one of --text and --input-ids")
    return tokenize(model, text) if text is not None else read_input_ids(input_ids)


class _layer_progress:
    """Decoder layers done, on stderr, when it is a terminal and the output is not JSON."""

    def __init__(self, label: str, disable: bool) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
        self.bar = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            console=render.err, transient=True, disable=disable or not render.err.is_terminal)
        self.task = self.bar.add_task(label, total=None)

    def __enter__(self):
        self.bar.start()
        return lambda done, total: self.bar.update(self.task, completed=done, total=total)

    def __exit__(self, *exc) -> None:
        self.bar.stop()


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
    from ctformat.convert import DTYPES
    from ctformat.inference import run as run_model
    ids = _ids(model, text, input_ids)
    with _layer_progress("layers", disable=as_json) as progress:
        doc = run_model(model, ids, top_k=top_k, generate=generate, device=device, dtype=DTYPES[dtype],
                        stream=stream, progress=progress)
    if as_json:
        render.emit_json(doc)
        return
    render.out.print(f"[bold]{doc['model']}[/]: {len(ids[0])} token(s) in, {doc['dtype']} on {doc['device']}"
                     f"{' (streamed)' if doc['streamed'] else ''}, {doc['timing']['seconds']:.2f} s")
    for b, top in enumerate(doc["next_token"]):
        render.out.print(f"next token{f' (sequence {b})' if len(doc['next_token']) > 1 else ''}:")
        for t in top:
            shown = "" if t["text"] is None else f" {t['text']!r}"
            render.out.print(f"  {t['id']:>7}{shown:<16} {t['prob']:.4f}")
    for b, g in enumerate(doc["generated_ids"]):
        if g:
            text_g = doc["generated_text"][b] if doc["generated_text"] else None
            render.out.print(f"generated: {g}" + (f" {text_g!r}" if text_g is not None else ""))


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
    from ctformat.convert import DTYPES
    from ctformat.inference import compare as compare_models
    ids = _ids(a, text, input_ids)
    with _layer_progress("layers", disable=as_json) as progress:
        doc = compare_models(a, b, ids, device=device, dtype=DTYPES[dtype], stream=stream, worst=worst,
                             progress=progress)
    if as_json:
        render.emit_json(doc)
        return
    w = doc["weights"]
    render.out.print(f"A {doc['a']}\nB {doc['b']}\n{doc['positions']} positions, {doc['dtype']} on {doc['device']}, "
                     f"{doc['seconds']:.2f} s")
    render.out.print(f"KL(A||B) nats  mean {doc['kl_mean']:.3e}  p50 {doc['kl_p50']:.3e}  p90 {doc['kl_p90']:.3e}  "
                     f"p99 {doc['kl_p99']:.3e}  max {doc['kl_max']:.3e}")
    render.out.print(f"top-1 agreement {doc['top1_agreement']:.4f}")
    if w["modules"]:
        render.out.print(f"weights: {w['modules']} modules, relative error mean {w['mean']:.3e}, max {w['max']:.3e}")
        for row in w["worst"]:
            render.out.print(f"  {row['rel_error']:.3e}  {row['module']}")
    for side in ("a", "b"):
        if w[f"only_in_{side}"]:
            render.out.print(f"only in {side.upper()}: {len(w[f'only_in_{side}'])} modules, "
                             f"e.g. {w[f'only_in_{side}'][0]}")
