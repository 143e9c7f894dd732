"""inspect and validate on full-size frontier layouts (Kimi-K2-Thinking: 62 shards, 208k tensors,
1.03 T parameters; Mixtral-8x22B w4a16), written as sparse files by make_frontier.py, timed
beside huggingface_hub.get_local_safetensors_metadata on the same files in the same run.

    python benchmarks/bench_frontier.py [--dir /tmp/ctformat-frontier] [--reps 5] [--json out.json]

Each tool runs as a fresh process (interpreter start included, as a user sees it), the tools
interleaved rep by rep so that background load hits all of them alike; wall time and peak RSS
come from wait4. This process stays small until every child has run (a child's peak RSS counts
what it inherited at fork), so the layouts are written by a child too. Speed-up = hf time /
ctformat time (> 1: ctformat is faster). Children cache bytecode as an installed package does
(child_env). A second, in-process pass times the library alone and
checks the parameter count (packed int4 words count 8 weights each: 1.03 T, where a naive element
count says 170 B).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

HERE = Path(__file__).absolute().parent
ROOT = HERE.parent          # the checkout measured: children run here, so `-m ctformat` is its code
# (layout, wall-time target in s, RSS target in MB, speed-up target over huggingface_hub)
TARGETS = {"kimi-k2-thinking": (0.7, 150, 2.0), "mixtral-8x22b-w4a16": (0.25, 150, None)}
HF = ("import sys, huggingface_hub as h; m = h.get_local_safetensors_metadata(sys.argv[1]); "
      "sum(m.parameter_count.values())")


def child_env(cache: Path) -> dict[str, str]:
    """The environment of every child: bytecode cached (in `cache`, outside the checkout), as an
    installed package has it. An inherited PYTHONDONTWRITEBYTECODE would make each run compile
    ctformat's ~60 modules from source (~50 ms) while the peer's site-packages hold .pyc files."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    return {**env, "PYTHONPYCACHEPREFIX": str(cache)}


ENV: dict[str, str] | None = None           # set by main(); None: this process's environment


def run_child(argv: list[str]) -> tuple[float, float, int]:
    """Wall seconds, peak RSS in MB and exit code of one fresh process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT, env=ENV)
    _, status, usage = os.wait4(proc.pid, 0)
    return time.perf_counter() - t0, usage.ru_maxrss / 1024, os.waitstatus_to_exitcode(status)


def tools(root: Path) -> dict[str, list[str]]:
    py = sys.executable
    return {
        "ctformat inspect --json": [py, "-m", "ctformat", "inspect", str(root), "--json"],
        "ctformat validate --json": [py, "-m", "ctformat", "validate", str(root), "--json"],
        "hf get_local_safetensors_metadata": [py, "-c", HF, str(root)],
        "python -c pass (floor)": [py, "-c", "pass"],
    }


def time_tools(root: Path, reps: int) -> dict[str, dict]:
    argvs = tools(root)
    runs: dict[str, list] = {name: [] for name in argvs}
    for rep in range(reps + 1):                   # rep 0 warms the page cache and is dropped
        for name, argv in argvs.items():
            wall, rss, code = run_child(argv)
            if code not in (0, 1):                # validate exits 1 when it finds errors
                raise SystemExit(f"{name} exited with {code}")
            if rep:
                runs[name].append((wall, rss))
    return {name: {"wall_s_median": statistics.median(w for w, _ in r), "wall_s_best": min(w for w, _ in r),
                   "peak_rss_mb": max(m for _, m in r)} for name, r in runs.items()}


def in_process(root: Path) -> dict:
    sys.path.insert(0, str(ROOT))
    from ctformat.checkpoint import open_checkpoint
    from ctformat.summary import summarize
    from ctformat.validate import validate_checkpoint
    t0 = time.perf_counter()
    ckpt = open_checkpoint(root)
    t1 = time.perf_counter()
    ckpt.module_classes()                # what inspect and validate build (spec §4.5), not a Module each
    t2 = time.perf_counter()
    doc = summarize(ckpt)
    t3 = time.perf_counter()
    report = validate_checkpoint(root)
    t4 = time.perf_counter()
    return {"open_s": t1 - t0, "modules_s": t2 - t1, "summarize_s": t3 - t2, "validate_s": t4 - t3,
            "parameters": doc["parameters"], "tensors": doc["tensors"], "modules_quantized": doc["modules_quantized"],
            "errors": len(report.errors), "warnings": len(report.warnings),
            "rules": sorted({i.rule for i in report.issues})}


def hf_parameters(root: Path) -> int:
    import huggingface_hub
    return sum(huggingface_hub.get_local_safetensors_metadata(root).parameter_count.values())


def report(name: str, run: dict) -> None:
    layout, results, lib = run["layout"], run["results"], run["library"]
    wall_t, rss_t, ratio_t = TARGETS[name]
    hf = results["hf get_local_safetensors_metadata"]["wall_s_median"]
    print(f"\n{name}: {layout['shards']} shards, {layout['tensors']} tensors, {layout['data_bytes'] / 1e9:.1f} GB "
          f"of (sparse) data, {layout['header_bytes'] / 1e6:.1f} MB of headers")
    print(f"{'tool (fresh process)':36s} {'median s':>9s} {'best s':>8s} {'RSS MB':>7s} {'speed-up':>9s}  target")
    for tool, r in results.items():
        speedup = hf / r["wall_s_median"]
        verdict = ""
        if tool.startswith("ctformat"):
            ok = r["wall_s_median"] <= wall_t and r["peak_rss_mb"] <= rss_t and (ratio_t is None or speedup >= ratio_t)
            verdict = ("PASS" if ok else "FAIL") + f" (<= {wall_t} s, <= {rss_t} MB" + (
                f", >= {ratio_t}x hf)" if ratio_t else ")")
        print(f"{tool:36s} {r['wall_s_median']:9.3f} {r['wall_s_best']:8.3f} {r['peak_rss_mb']:7.1f} "
              f"{speedup:8.2f}x  {verdict}")
    p = lib["parameters"]
    print(f"in-process: open {lib['open_s']:.3f} s, module classes {lib['modules_s']:.3f} s, summarize "
          f"{lib['summarize_s']:.3f} s, validate {lib['validate_s']:.3f} s")
    print(f"parameters: ctformat {p['total'] / 1e12:.3f} T ({p['quantized'] / 1e12:.3f} T quantized), "
          f"huggingface_hub {lib['hf_parameters'] / 1e9:.1f} B (packed words counted as weights)")
    print(f"validate: {lib['errors']} errors, {lib['warnings']} warnings {lib['rules']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", default="/tmp/ctformat-frontier")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    base = Path(a.dir)
    if base.exists():
        shutil.rmtree(base)
    base.mkdir(parents=True)
    global ENV
    ENV = child_env(base / "pycache")        # rep 0 of each layout fills it, and is dropped
    load = os.getloadavg()[0]
    print(f"{date.today()}  {platform.processor() or platform.machine()}  {os.cpu_count()} cores  "
          f"Python {platform.python_version()}  load {load:.2f}")
    layouts = {"kimi-k2-thinking": "kimi", "mixtral-8x22b-w4a16": "mixtral"}
    out = {}
    for name, kind in layouts.items():
        made = subprocess.run([sys.executable, str(HERE / "make_frontier.py"), kind, str(base / name)],
                              capture_output=True, text=True, check=True)
        out[name] = {"layout": json.loads(made.stdout), "results": time_tools(base / name, a.reps)}
    for name in layouts:                          # in-process passes last: this process grows here
        lib = in_process(base / name)
        lib["hf_parameters"] = hf_parameters(base / name)
        out[name]["library"] = lib
        report(name, out[name])
        shutil.rmtree(base / name)
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f} (start {load:.2f}); shared machines: compare the "
          "speed-ups, measured in the same run, rather than the seconds")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
