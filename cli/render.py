"""Everything the CLI shows: rich tables and lines for people, JSON for programs, one progress
bar, one error line. Results go to stdout; errors and progress to stderr."""
from __future__ import annotations

import json
from typing import Any, Callable

from ctformat.errors import CtFormatError


class _Console:
    """A rich Console made on first use: `--json` output never imports rich (~30 ms of a
    fresh process)."""

    def __init__(self, **options: Any) -> None:
        object.__setattr__(self, "_options", options)
        object.__setattr__(self, "_console", None)

    def _rich(self) -> Any:
        if self._console is None:
            from rich.console import Console
            object.__setattr__(self, "_console", Console(**self._options))
        return self._console

    def __getattr__(self, name: str) -> Any:
        return getattr(self._rich(), name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._rich(), name, value)       # (a test sets the width) the Console's own


out = _Console(highlight=False, soft_wrap=True)
err = _Console(stderr=True, highlight=False, soft_wrap=True)


def escape(text: str) -> str:
    from rich.markup import escape as rich_escape
    return rich_escape(text)


def Table(*args: Any, **kwargs: Any):     # noqa: N802 (rich's class, imported when a table is drawn)
    from rich.table import Table as RichTable
    return RichTable(*args, **kwargs)

EXIT_CODES = """\b
Exit codes:
  0  success (validate: no errors; warnings allowed)
  1  errors found in the checkpoint, or it could not be read
  2  usage error (bad option or argument)
  3  internal error (a bug; rerun with --debug and report it)"""

INFER_EXIT_CODES = EXIT_CODES + """
  (run, compare: 1 also for an architecture transformers does not know, or weights it
  would not read; 2 also for --text without a tokenizer, token ids out of range, and
  compare of two different architectures)"""

# library keyword that would allow what an error refused -> what the user types
OPTION_HINTS = {"force": "use --force to replace it", "allow_lossy_scales": "pass --allow-lossy-scales to convert anyway",
                "allow_lossy": "pass --allow-lossy to write fp16(s) and report the error",
                "device": "use --device cpu", "resume": "rerun with --resume to continue"}


def size(n: int | None) -> str:
    """Decimal human units, as the Hub and rich's progress columns use."""
    if n is None:
        return "-"
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return str(n)


def count(n: int) -> str:
    for unit, k in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= k:
            return f"{n / k:.2f}{unit}"
    return str(n)


def emit_json(doc: Any) -> None:
    print(json.dumps(doc, indent=2))


# -- errors ------------------------------------------------------------------------------
def error(exc: Exception) -> int:
    """One line on stderr for an exception that ends a command; its exit code."""
    if isinstance(exc, CtFormatError):
        text = exc.render(OPTION_HINTS.get(exc.option or ""))
        err.print(f"[red]Error:[/] {escape(text)}", markup=True, highlight=False)
        return exc.exit_code
    if isinstance(exc, (OSError, MemoryError)):
        err.print(f"[red]Error:[/] {escape(str(exc))}")
        return 1
    err.print(f"[red]Internal error:[/] {type(exc).__name__}: {escape(str(exc))} (rerun with --debug for the traceback)")
    return 3


class ProgressBar:
    """A rich progress bar on stderr, as a progress(done, total) callback; `unit` is "bytes"
    (size, speed, ETA) or "items" (done/total, elapsed, gone when finished)."""

    def __init__(self, label: str, *, unit: str = "bytes", disable: bool = False) -> None:
        self.bar = None                   # disabled: a no-op callback, rich never imported
        if disable:
            return
        from rich.progress import (BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn, TransferSpeedColumn)
        columns = ((DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[note]}"))
                   if unit == "bytes" else (MofNCompleteColumn(), TimeElapsedColumn()))
        self.bar = Progress(TextColumn(label), BarColumn(), *columns, console=err, transient=unit != "bytes",
                            disable=not err.is_terminal)
        self.task = self.bar.add_task(label, total=None, note="")

    def __enter__(self) -> Callable[..., None]:
        """progress(done, total[, note]): note is a few words after the ETA (workers alive)."""
        if self.bar is None:
            return _no_progress
        self.bar.start()
        return lambda done, total, note="": self.bar.update(self.task, completed=done, total=total, note=note)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()


def _no_progress(done: int, total: int, note: str = "") -> None:
    """The callback of a disabled bar."""


# -- inspect -----------------------------------------------------------------------------
def summary(d: dict[str, Any]) -> None:
    if d["schema"] == "ctformat.inspect-gguf/1":
        gguf_summary(d)
        return
    t = Table(title=f"[bold]{d['path']}[/]", show_header=False, box=None, pad_edge=False)
    t.add_column(style="bold")
    t.add_column()
    p, b = d["parameters"], d["bytes"]
    t.add_row("architecture", str(d["architecture"]))
    d = dict(d, producer_version=None if d["producer_version"] is None else str(d["producer_version"]))
    fmt = d["format"] or (f"{d['sparsity']['format']} (legacy sparsity_config)" if d.get("sparsity") else None)
    t.add_row("quantization", f"{d['quant_method']} / {fmt}" if d["quant_method"] else "none (dense)")
    beyond = _beyond_pack(d)
    if beyond and d["module_formats"]:
        t.add_row("module formats", ", ".join(f"{k} ({v})" for k, v in d["module_formats"].items()))
    if d.get("marlin"):
        m = d["marlin"]
        t.add_row("marlin layout", f"{m['layout']}, " + ("loadable by legacy Marlin readers" if m["legacy_readers"]
                                                          else "ctformat-marlin (no stock loader)")
                  + (f", {m['stacked_expert_layers']} stacked expert layer(s)" if m["stacked_expert_layers"] else ""))
    if d.get("gptq"):
        g = d["gptq"]
        t.add_row(f"{g['method']} layout", (f"{g['format']}, " if g["method"] == "gptq" else "gemm, ")
                  + ("ctformat provenance block (converts back bit for bit)" if g["provenance"]
                     else "no ctformat provenance (another tool's file)")
                  + (f", {g['dynamic_rules']} dynamic rule(s)" if g["dynamic_rules"] else ""))
    t.add_row("producer", d["producer_version"] or ("unknown" if d.get("gptq") else
                                                    "compressed-tensors < 0.6 era or unknown (no version key)"))
    t.add_row("parameters", f"{count(p['total'])} ({count(p['quantized'])} quantized, {count(p['dense'])} dense)")
    t.add_row("size on disk", f"{size(b['total'])} in {len(d['shards'])} shard(s), {d['tensors']} tensors")
    if d["bits_per_quantized_weight"]:
        t.add_row("bits/weight", f"{d['bits_per_quantized_weight']} (quantized modules, " + (
            "every scale, global scale, zero point and bitmask included)" if beyond else
            "scales and zero points included)"))
    t.add_row("dense bf16 size", size(d["dense_equivalent_bytes"]))
    t.add_row("load memory", f"{size(d['load_bytes'])} (weights as stored)")
    t.add_row("by role", ", ".join(f"{k} {size(v)}" for k, v in b["by_role"].items()))
    t.add_row("by dtype", ", ".join(f"{k} {size(v)}" for k, v in b["by_dtype"].items()))
    for label, value in _feature_rows(d):
        t.add_row(label, value)
    out.print(t)
    if d["config_groups"] and beyond:
        _format_groups(d["config_groups"])
    elif d["config_groups"]:
        g = Table(title="config groups", title_justify="left")
        for col in ("group", "bits", "strategy", "group size", "symmetric", "actorder", "modules"):
            g.add_column(col, no_wrap=True)
        g.add_column("covers", overflow="fold", min_width=30)
        for x in d["config_groups"]:
            g.add_row(x["name"], str(x["num_bits"]), str(x["strategy"]), str(x["group_size"] or "-"),
                      "yes" if x["symmetric"] else "no", str(x["actorder"] or "-"), str(x["modules"]),
                      "\n".join(x["modules_folded"]) or "-")
        out.print(g)
    if d["ignored_modules"] or d["dense_linear_modules"]:
        out.print(f"[bold]ignore[/] {', '.join(d['ignore']) or '-'}")
        out.print(f"[bold]dense linear modules[/] {', '.join(d['dense_linear_modules']) or '-'}")


def _beyond_pack(d: dict[str, Any]) -> bool:
    """Anything the pack-quantized layout of the table does not show (spec/formats.md)."""
    return bool(set(d.get("module_formats") or {}) - {"pack-quantized"} or d.get("kv_cache_scheme")
                or d.get("transforms") or d.get("sparsity")
                or any(g.get("input_activations") or g.get("output_activations") for g in d["config_groups"]))


def _feature_rows(d: dict[str, Any]) -> list[tuple[str, str]]:
    rows = []
    if d.get("kv_cache_scheme"):
        rows.append(("kv cache", f"{d['kv_cache_scheme']['words']}: k_scale/v_scale on "
                                 f"{', '.join(d['kv_cache_modules']) or 'no module'}"))
    for t in d.get("transforms") or ():
        where = ("online" if t["online"] else "fused into the stored weights")
        size = f", head_dim {t['head_dim']}" if t["head_dim"] else ""
        tensors = f", {len(t['rotation_tensors'])} rotation tensor(s)" if t["online"] else ""
        rows.append((f"transform {t['scheme']}", f"{t['type']} at {t['location']}{' (inverse)' if t['inverse'] else ''}"
                                                 f", {where}{size}, {t['modules']} modules{tensors}"))
    if d.get("sparsity"):
        s = d["sparsity"]
        rows.append(("sparsity", f"{s['format']} on {s['modules']} modules (compressed-tensors <= 0.14)"))
    return rows


def _format_groups(groups: list[dict[str, Any]]) -> None:
    """The config groups of any format: weights and input activations in words."""
    g = Table(title="config groups", title_justify="left")
    for col in ("group", "format", "weights", "input activations", "bits/weight", "modules"):
        g.add_column(col, no_wrap=col != "input activations")
    g.add_column("covers", overflow="fold", min_width=30)
    for x in groups:
        w, a = x["weights"], x["input_activations"]
        g.add_row(x["name"], str(x["format"] or "-"), w["words"] if w else "-", a["words"] if a else "-",
                  str(x["bits_per_weight"] or "-"), str(x["modules"]), "\n".join(x["modules_folded"]) or "-")
    out.print(g)


def gguf_summary(d: dict[str, Any]) -> None:
    t = Table(title=f"[bold]{escape(d['path'])}[/]", show_header=False, box=None, pad_edge=False)
    t.add_column(style="bold")
    t.add_column()
    p = d["parameters"]
    t.add_row("format", f"GGUF version {d['version']}")
    t.add_row("architecture", f"{d['architecture']}" + (f" ({escape(str(d['name']))})" if d["name"] else ""))
    if d["block_count"] is not None:
        t.add_row("layers", str(d["block_count"]) + (f", context {d['context_length']}" if d["context_length"] else ""))
    t.add_row("parameters", f"{count(p['total'])} ({count(p['quantized'])} in quantized blocks, {count(p['float'])} float)")
    t.add_row("size", f"{size(d['bytes']['total'])} of tensor data in {len(d['files'])} file(s), {d['tensors']} tensors")
    if d["bits_per_weight"] is not None:
        t.add_row("bits/weight", f"{d['bits_per_weight']} overall"
                  + (f", {d['bits_per_quantized_weight']} in quantized tensors" if d["bits_per_quantized_weight"] else ""))
    t.add_row("tokenizer", "none" if d["tokenizer"] is None else
              f"{d['tokenizer']['model']}, pre {d['tokenizer']['pre']}, {d['tokenizer']['tokens']} tokens")
    out.print(t)
    g = Table(title="ggml types", title_justify="left")
    for col in ("type", "tensors", "parameters", "size", "bits/weight"):
        g.add_column(col, justify="left" if col == "type" else "right")
    for name, row in d["ggml_types"].items():
        g.add_row(name, str(row["tensors"]), count(row["parameters"]), size(row["bytes"]), str(row["bits_per_weight"]))
    out.print(g)


def tensors(rows: list[dict[str, Any]]) -> None:
    t = Table(title="tensors", title_justify="left")
    for col in ("name", "dtype", "shape", "size", "file"):
        t.add_column(col, justify="right" if col == "size" else "left", overflow="fold")
    for r in rows:
        t.add_row(r["name"], r["dtype"], "×".join(map(str, r["shape"])) or "scalar", size(r["bytes"]), r["file"])
    out.print(t)


# -- validate ----------------------------------------------------------------------------
def report(r: dict[str, Any]) -> None:
    """One line per issue (grep-friendly), then the verdict."""
    for i in r["issues"]:
        sev = "[red]error  [/]" if i["severity"] == "error" else "[yellow]warning[/]"
        loc = ": ".join(x for x in (i["file"], i["where"]) if x)
        out.print(f"{sev} [bold]{i['rule']}[/] {escape(loc)}: {escape(i['message'])}")
    verdict = "[green]OK[/]" if r["ok"] else "[red]FAILED[/]"
    checked = (f"{r['tensors_checked']} GGUF tensors checked (headers)" if r.get("format") == "gguf" else
               f"{r['modules_checked']} quantized modules checked{' (deep)' if r['deep'] else ''}")
    out.print(f"{verdict} {r['path']}: {r['errors']} error(s), {r['warnings']} warning(s), {checked}")


# -- convert -----------------------------------------------------------------------------
def converted(r, seconds: float) -> None:
    """One line: what a conversion (a ConvertResult) wrote."""
    out.print(f"wrote {r.output}: {r.modules} modules {r.verb}, {r.tensors_copied} tensors copied, "
              f"{size(r.bytes_read)} read in {seconds:.1f} s on {r.device}"
              + (f" ({r.cpu_fallbacks} on the CPU after GPU out-of-memory)" if r.cpu_fallbacks else "")
              + (f", {r.details['tensors_dropped']} tensors read and not written (activation scales, folded "
                 "rotations, dropped kv-cache scales)" if r.details.get("tensors_dropped") else "")
              + (" (legacy Marlin format: quant_method gptq, checkpoint_format marlin)"
                 if r.details.get("legacy_format") else "")
              + (gptq_details(r.details, r.target) if r.target in ("gptq", "awq") else ""))
    if r.target == "gguf":
        gguf_details(r.details)


def gguf_details(d: dict[str, Any]) -> None:
    """What --to gguf wrote beyond the counts: files, types, what is not exact, what was left out."""
    out.print(f"  {len(d['files'])} file(s), {size(d['bytes_written'])}, {d['tensors']} tensors: "
              + ", ".join(f"{k} {v}" for k, v in d["ggml_types"].items()))
    if d["lossy_scales"]:
        out.print(f"  --allow-lossy: {d['lossy_scales']} scale(s) rounded to fp16, largest relative error "
                  f"{d['lossy_max_rel_error']:.3g}")
    if d["dequantized_modules"]:
        out.print(f"  {len(d['dequantized_modules'])} quantized module(s) written as floats: "
                  f"{', '.join(d['dequantized_modules'][:3])}{' ...' if len(d['dequantized_modules']) > 3 else ''}")
    if d["dropped"]:
        reasons = sorted(set(d["dropped"].values()))
        out.print(f"  left out as llama.cpp's converter does: {len(d['dropped'])} tensor(s) ({'; '.join(reasons)})")


def gptq_details(d: dict[str, Any], target: str) -> str:
    """The tail of --to gptq / --to awq's line: format, MoE renames, rounded scales."""
    n = d.get("renamed_modules", 0)
    return (f", {target} format {d['format']}"
            + (f", {n} MoE module{'s' if n != 1 else ''} renamed for GPTQModel" if n else "")
            + (f"; {d['lossy_scales']} scales rounded to float16 (largest change {d['largest_scale_change']:.3g})"
               if d.get("lossy_scales") else ""))


# -- run and compare ---------------------------------------------------------------------
def run_result(doc: dict[str, Any]) -> None:
    out.print(f"[bold]{doc['model']}[/]: {len(doc['input_ids'][0])} token(s) in, {doc['dtype']} on {doc['device']}"
              f"{' (streamed)' if doc['streamed'] else ''}, {doc['timing']['seconds']:.2f} s")
    _weight_only(doc["not_simulated"])
    for b, top in enumerate(doc["next_token"]):
        out.print(f"next token{f' (sequence {b})' if len(doc['next_token']) > 1 else ''}:")
        for t in top:
            shown = "" if t["text"] is None else f" {t['text']!r}"
            out.print(f"  {t['id']:>7}{shown:<16} {t['prob']:.4f}")
    for b, g in enumerate(doc["generated_ids"]):
        if g:
            text_g = doc["generated_text"][b] if doc["generated_text"] else None
            out.print(f"generated: {g}" + (f" {text_g!r}" if text_g is not None else ""))


def _weight_only(skipped: list[str], side: str | None = None) -> None:
    if skipped:
        out.print(f"weight-only reference inference{f' ({side})' if side else ''}: {', '.join(skipped)} "
                  "quantization not simulated")


def compare_result(doc: dict[str, Any]) -> None:
    w = doc["weights"]
    out.print(f"A {doc['a']}\nB {doc['b']}\n{doc['positions']} positions, {doc['dtype']} on {doc['device']}, "
              f"{doc['seconds']:.2f} s")
    for side in ("a", "b"):
        _weight_only(doc["not_simulated"][side], side.upper())
    out.print(f"KL(A||B) nats  mean {doc['kl_mean']:.3e}  p50 {doc['kl_p50']:.3e}  p90 {doc['kl_p90']:.3e}  "
              f"p99 {doc['kl_p99']:.3e}  max {doc['kl_max']:.3e}")
    out.print(f"top-1 agreement {doc['top1_agreement']:.4f}")
    if w["modules"]:
        out.print(f"weights: {w['modules']} modules, relative error mean {w['mean']:.3e}, max {w['max']:.3e}")
        for row in w["worst"]:
            out.print(f"  {row['rel_error']:.3e}  {row['module']}")
    for side in ("a", "b"):
        if w[f"only_in_{side}"]:
            out.print(f"only in {side.upper()}: {len(w[f'only_in_{side}'])} modules, "
                      f"e.g. {w[f'only_in_{side}'][0]}")
