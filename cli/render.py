"""Everything the CLI shows: rich tables for people, JSON for programs. Results to stdout,
errors and progress to stderr."""
from __future__ import annotations

import json
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


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


def summary(d: dict[str, Any]) -> None:
    t = Table(title=f"[bold]{d['path']}[/]", show_header=False, box=None, pad_edge=False)
    t.add_column(style="bold")
    t.add_column()
    p, b = d["parameters"], d["bytes"]
    t.add_row("architecture", str(d["architecture"]))
    d = dict(d, producer_version=None if d["producer_version"] is None else str(d["producer_version"]))
    t.add_row("quantization", f"{d['quant_method']} / {d['format']}" if d["quant_method"] else "none (dense)")
    if d.get("marlin"):
        m = d["marlin"]
        t.add_row("marlin layout", f"{m['layout']}, " + ("loadable by legacy Marlin readers" if m["legacy_readers"]
                                                          else "ctformat-marlin (no stock loader)")
                  + (f", {m['stacked_expert_layers']} stacked expert layer(s)" if m["stacked_expert_layers"] else ""))
    t.add_row("producer", d["producer_version"] or "compressed-tensors < 0.6 era or unknown (no version key)")
    t.add_row("parameters", f"{count(p['total'])} ({count(p['quantized'])} quantized, {count(p['dense'])} dense)")
    t.add_row("size on disk", f"{size(b['total'])} in {len(d['shards'])} shard(s), {d['tensors']} tensors")
    if d["bits_per_quantized_weight"]:
        t.add_row("bits/weight", f"{d['bits_per_quantized_weight']} (quantized modules, scales and zero points included)")
    t.add_row("dense bf16 size", size(d["dense_equivalent_bytes"]))
    t.add_row("load memory", f"{size(d['load_bytes'])} (weights as stored)")
    t.add_row("by role", ", ".join(f"{k} {size(v)}" for k, v in b["by_role"].items()))
    t.add_row("by dtype", ", ".join(f"{k} {size(v)}" for k, v in b["by_dtype"].items()))
    out.print(t)
    if d["config_groups"]:
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


def tensors(rows: list[dict[str, Any]]) -> None:
    t = Table(title="tensors", title_justify="left")
    for col in ("name", "dtype", "shape", "size", "file"):
        t.add_column(col, justify="right" if col == "size" else "left", overflow="fold")
    for r in rows:
        t.add_row(r["name"], r["dtype"], "×".join(map(str, r["shape"])) or "scalar", size(r["bytes"]), r["file"])
    out.print(t)


def report(r: dict[str, Any]) -> None:
    """One line per issue (grep-friendly), then the verdict."""
    for i in r["issues"]:
        sev = "[red]error  [/]" if i["severity"] == "error" else "[yellow]warning[/]"
        loc = ": ".join(x for x in (i["file"], i["where"]) if x)
        out.print(f"{sev} [bold]{i['rule']}[/] {escape(loc)}: {escape(i['message'])}")
    verdict = "[green]OK[/]" if r["ok"] else "[red]FAILED[/]"
    out.print(f"{verdict} {r['path']}: {r['errors']} error(s), {r['warnings']} warning(s), "
              f"{r['modules_checked']} quantized modules checked{' (deep)' if r['deep'] else ''}")
