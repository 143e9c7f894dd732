#!/usr/bin/env python
"""Core pack / unpack / dequantize / compress throughput: ctformat vs compressed-tensors.

Times ctformat against its peer, compressed-tensors (CT), in the same process, on the
issue's weight shape [out=4096, in=14336], and prints ratios (speed-up = CT time /
ctformat time; > 1 means ctformat is faster). A plain torch clone of the packed int32
tensor and of the bf16 output is timed in the same run as the memory-bandwidth limit.

Method: every pair of outputs is checked with torch.equal before anything is timed; then
one warm-up call of each side, then N timed runs with ctformat and CT interleaved (the
order alternating each run) so background load hits both. Median and best are reported;
targets are judged on the ratio of medians.

--contended runs the same comparison while two other processes load the machine, started
and stopped by the script (each also stops itself after --hog-seconds): a busy loop, and a
process streaming memory (numpy.copyto between two --hog-mib arrays in a loop), pinned one to
each of the first two cores this process may use. Every pack, unpack, dequantize and compress
row then has the target >= 1.0x.

Not part of the test suite and makes no timed assertions. Run from the repository root:

    python benchmarks/bench_core.py [--reps 9] [--bits 4,8,3] [--json results.json] [--contended]
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

import compressed_tensors
from compressed_tensors.compressors import BaseCompressor
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32 as ct_pack
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32 as ct_unpack
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from compressed_tensors.quantization.utils import calculate_qparams as ct_qparams

import ctformat
from ctformat import pack, quant
from ctformat.scheme import QuantScheme, Strategy

OUT, IN = 4096, 14336
N = OUT * IN

# (operation, bits) -> minimum speed-up over CT that the issue asks for (ratio of medians).
TARGETS = {("pack", 4): 5.0, ("unpack", 4): 1.5, ("dequantize", None): 1.0}

# With --contended, every row of these operations must be at least as fast as CT.
CONTENDED_OPS = ("pack", "unpack", "dequantize", "compress")

# Layer-level schemes: (label, bits, symmetric, strategy, group_size)
SCHEMES = [("W4 sym g128", 4, True, "group", 128),
           ("W4 asym g128", 4, False, "group", 128),
           ("W8 sym channel", 8, True, "channel", None)]


# ---------------------------------------------------------------------------- machine

def machine_info() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        usable = os.cpu_count()
    return {"cpu": cpu, "cores": os.cpu_count(), "cores_usable": usable,
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "compressed_tensors": compressed_tensors.__version__,
            "ctformat": getattr(ctformat, "__version__", "editable"),
            "python": platform.python_version(),
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "loadavg_start": list(os.getloadavg())}


# ---------------------------------------------------------------------------- load

_BUSY = "import sys, time\nend = time.monotonic() + float(sys.argv[1])\nprint(flush=True)\n" \
        "while time.monotonic() < end:\n    pass\n"
_STREAM = ("import sys, time\nimport numpy as np\nend = time.monotonic() + float(sys.argv[1])\n"
           "a = np.ones(int(sys.argv[2]) << 17)\nb = np.empty_like(a)\nprint(flush=True)\n"
           "while time.monotonic() < end:\n    np.copyto(b, a)\n")


def start_hogs(seconds: float, mib: int) -> list[subprocess.Popen]:
    """A busy loop and a memory streamer, one pinned to each of our first two cores; each
    exits by itself after `seconds`. Returns once both run their loops."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    hogs = []
    for i, code in enumerate((_BUSY, _STREAM)):
        p = subprocess.Popen([sys.executable, "-c", code, str(seconds), str(mib)], stdout=subprocess.PIPE)
        if cores:
            os.sched_setaffinity(p.pid, {cores[i % len(cores)]})
        hogs.append(p)
    for p in hogs:
        p.stdout.readline()          # the hog prints a line when its loop starts
    return hogs


def stop_hogs(hogs: list[subprocess.Popen]) -> None:
    for p in hogs:
        p.terminate()
    for p in hogs:
        p.wait()


# ---------------------------------------------------------------------------- timing

def _time_once(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_pair(ours, theirs, reps: int) -> tuple[list[float], list[float]]:
    """Warm up both, then `reps` interleaved runs; the order alternates every run."""
    ours()
    theirs()
    a, b = [], []
    gc_was = gc.isenabled()
    gc.disable()
    try:
        for i in range(reps):
            if i % 2 == 0:
                a.append(_time_once(ours))
                b.append(_time_once(theirs))
            else:
                b.append(_time_once(theirs))
                a.append(_time_once(ours))
    finally:
        if gc_was:
            gc.enable()
    return a, b


def bench_one(fn, reps: int) -> list[float]:
    fn()
    return [_time_once(fn) for _ in range(reps)]


def _stats(ts: list[float]) -> dict:
    return {"median_ms": statistics.median(ts) * 1e3, "best_ms": min(ts) * 1e3,
            "runs_ms": [t * 1e3 for t in ts]}


def _check(name: str, ok: bool) -> None:
    if not ok:
        raise SystemExit(f"OUTPUT MISMATCH in {name}: ctformat and compressed-tensors disagree; not timing")


# ---------------------------------------------------------------------------- workloads

def _row(results: list, op: str, bits, what: str, ours: list[float], theirs: list[float] | None,
         weights: int = N, target_key=None, nbytes: int | None = None) -> dict:
    o = _stats(ours)
    row = {"op": op, "bits": bits, "what": what, "loadavg_1min": os.getloadavg()[0], "ctformat": o,
           "ctformat_mweights_s": weights / (o["median_ms"] * 1e3)}
    if nbytes is not None:   # a copy: bytes read + bytes written per second
        row["copy_gb_s"] = 2 * nbytes / (o["median_ms"] * 1e-3) / 1e9
        row["what"] = f"{what}, {row['copy_gb_s']:.1f} GB/s read+write"
    if theirs is not None:
        t = _stats(theirs)
        row["ct"] = t
        row["ct_mweights_s"] = weights / (t["median_ms"] * 1e3)
        row["speedup_median"] = t["median_ms"] / o["median_ms"]
        row["speedup_best"] = t["best_ms"] / o["best_ms"]
        target = TARGETS.get(target_key if target_key is not None else (op, bits))
        if CONTENDED and op in CONTENDED_OPS:
            target = 1.0
        if target is not None:
            row["target"] = target
            row["pass"] = row["speedup_median"] >= target
    results.append(row)
    return row


def bench_bits(bits: int, reps: int, results: list) -> None:
    lo, hi = -(1 << (bits - 1)), 1 << (bits - 1)
    q = torch.randint(lo, hi, (OUT, IN), dtype=torch.int8)

    a, b = pack.pack_to_int32(q, bits), ct_pack(q, bits)
    _check(f"pack int{bits}", torch.equal(a, b))
    packed = b
    del a, b
    a, b = pack.unpack_from_int32(packed, bits, q.shape), ct_unpack(packed, bits, q.shape)
    _check(f"unpack int{bits}", torch.equal(a, b) and torch.equal(a, q))
    del a, b

    ours, theirs = bench_pair(lambda: pack.pack_to_int32(q, bits), lambda: ct_pack(q, bits), reps)
    _row(results, "pack", bits, f"pack_to_int32 int{bits} -> {tuple(packed.shape)}", ours, theirs)
    ours, theirs = bench_pair(lambda: pack.unpack_from_int32(packed, bits, q.shape),
                              lambda: ct_unpack(packed, bits, q.shape), reps)
    _row(results, "unpack", bits, f"unpack_from_int32 int{bits}", ours, theirs)
    # bandwidth limit: read + write of the packed tensor
    _row(results, "clone", bits, f"torch clone of packed int32 ({packed.numel() * 4 / 2**20:.0f} MiB)",
         bench_one(packed.clone, reps), None, nbytes=packed.numel() * 4)


def _schemes(label_bits, sym, strat, gs):
    args = QuantizationArgs(num_bits=label_bits, type="int", symmetric=sym, strategy=strat, group_size=gs)
    return (QuantizationScheme(targets=["Linear"], weights=args), args,
            QuantScheme(num_bits=label_bits, symmetric=sym, strategy=Strategy(strat), group_size=gs))


def bench_layer(label: str, bits: int, sym: bool, strat: str, gs, reps: int, results: list,
                W: torch.Tensor, clone_done: list) -> None:
    ct_scheme, ct_args, our_scheme = _schemes(bits, sym, strat, gs)
    comp = BaseCompressor.get_value_from_registry("pack-quantized")

    # Same qparams for both sides (CT's min-max observer math; ctformat's must agree).
    if strat == "group":
        g = W.unflatten(-1, (-1, gs))
        scale, zp = ct_qparams(g.amin(-1), g.amax(-1), ct_args)
    else:
        scale, zp = ct_qparams(W.amin(-1, keepdim=True), W.amax(-1, keepdim=True), ct_args)
    our_scale, our_zp = quant.calculate_qparams(W, our_scheme)
    _check(f"{label} scale", torch.equal(scale, our_scale))
    if not sym:
        _check(f"{label} zero point", torch.equal(zp.to(torch.int8), our_zp))
    our_zp = None if sym else our_zp

    sd = {"weight": W, "weight_scale": scale, "weight_zero_point": zp}
    ct_out = comp.compress(sd, ct_scheme)
    our_out = quant.compress(W, our_scheme, scale=our_scale, zero_point=our_zp)
    _check(f"{label} compress keys", set(ct_out) == set(our_out))
    for k in our_out:
        _check(f"{label} compress {k}", torch.equal(ct_out[k], our_out[k]))
    del our_out

    w_ct = comp.decompress(ct_out, ct_scheme)["weight"]
    w_ours = quant.decompress(ct_out, our_scheme)
    _check(f"{label} decompress", w_ours.dtype == torch.bfloat16 and torch.equal(w_ct, w_ours))
    del w_ct

    ours, theirs = bench_pair(lambda: quant.decompress(ct_out, our_scheme),
                              lambda: comp.decompress(ct_out, ct_scheme), reps)
    _row(results, "dequantize", bits, f"{label}: unpack + scale -> bf16", ours, theirs,
         target_key=("dequantize", None))
    ours, theirs = bench_pair(lambda: quant.compress(W, our_scheme, scale=our_scale, zero_point=our_zp),
                              lambda: comp.compress(sd, ct_scheme), reps)
    _row(results, "compress", bits, f"{label}: quantize + pack, bf16 in", ours, theirs)
    if not clone_done:
        _row(results, "clone", "bf16", f"torch clone of bf16 weight ({w_ours.numel() * 2 / 2**20:.0f} MiB)",
             bench_one(w_ours.clone, reps), None, nbytes=w_ours.numel() * 2)
        clone_done.append(True)


# ---------------------------------------------------------------------------- report

CONTENDED = False


def _fmt_row(r: dict) -> str:
    o = r["ctformat"]
    bits = f"int{r['bits']}" if isinstance(r["bits"], int) else str(r["bits"])
    s = f"{r['op']:<10} {bits:<5} {o['median_ms']:9.1f} {o['best_ms']:8.1f} {r['ctformat_mweights_s']:8.0f}"
    if "ct" in r:
        t = r["ct"]
        s += (f" {t['median_ms']:9.1f} {t['best_ms']:8.1f} {r['ct_mweights_s']:8.0f}"
              f" {r['speedup_median']:7.2f}x {r['speedup_best']:6.2f}x")
        if "target" in r:
            s += f"  >={r['target']:.1f}x {'PASS' if r['pass'] else 'FAIL'}"
    else:
        s += f" {'-':>9} {'-':>8} {'-':>8} {'-':>8} {'-':>7}"
    return s + f"  {r['what']}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=9, help="timed runs per side (default 9)")
    ap.add_argument("--bits", default="4,8,3",
                    help="comma-separated bit widths for pack/unpack; layer schemes whose bits are "
                         "not listed are skipped (default 4,8,3)")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    ap.add_argument("--seed", type=int, default=0, help="torch.manual_seed for the inputs (default 0)")
    ap.add_argument("--contended", action="store_true",
                    help="time everything while a busy loop and a memory streamer run on two cores")
    ap.add_argument("--hog-seconds", type=float, default=1200,
                    help="with --contended: each load process stops itself after this long (default 1200)")
    ap.add_argument("--hog-mib", type=int, default=512,
                    help="with --contended: size of each of the streamer's two arrays (default 512)")
    args = ap.parse_args(argv)
    if args.reps < 1:
        ap.error("--reps must be >= 1")
    global CONTENDED
    CONTENDED = args.contended
    hogs = start_hogs(args.hog_seconds, args.hog_mib) if args.contended else []
    try:
        return _run(args, hogs)
    finally:
        stop_hogs(hogs)


def _run(args, hogs) -> int:
    bits_list = [int(b) for b in args.bits.split(",") if b.strip()]
    torch.manual_seed(args.seed)
    info = machine_info()
    print(f"# ctformat vs compressed-tensors, core kernels  [{info['date']}]")
    print(f"# cpu: {info['cpu']}; cores {info['cores']} (usable {info['cores_usable']}); "
          f"torch threads {info['torch_threads']}")
    print(f"# torch {info['torch']}, compressed-tensors {info['compressed_tensors']}, "
          f"python {info['python']}")
    print(f"# weight [{OUT}, {IN}] = {N / 1e6:.1f} M weights; reps {args.reps} (+1 warm-up), interleaved; "
          f"load average at start {info['loadavg_start'][0]:.2f} {info['loadavg_start'][1]:.2f} "
          f"{info['loadavg_start'][2]:.2f}")
    if hogs:
        print(f"# CONTENDED: a busy loop (pid {hogs[0].pid}) and a memory streamer (pid {hogs[1].pid}, numpy.copyto "
              f"of {args.hog_mib} MiB) run throughout; target >= 1.0x for every {', '.join(CONTENDED_OPS)} row")
        info["contended"] = {"hog_mib": args.hog_mib, "hog_seconds": args.hog_seconds}
    print("# speed-up = CT time / ctformat time (>1: ctformat faster); PASS/FAIL on the ratio of medians")
    print("# command: " + " ".join([os.path.basename(sys.executable)] + sys.argv))
    print()
    hdr = (f"{'op':<10} {'bits':<5} {'ctf med':>9} {'ctf best':>8} {'ctf Mw/s':>8}"
           f" {'CT med':>9} {'CT best':>8} {'CT Mw/s':>8} {'x med':>8} {'x best':>7}  target")
    print(hdr)
    print("-" * len(hdr))

    results: list[dict] = []
    t_start = time.perf_counter()
    for bits in bits_list:
        start = len(results)
        bench_bits(bits, args.reps, results)
        for r in results[start:]:
            print(_fmt_row(r), flush=True)
        gc.collect()

    W = (torch.randn(OUT, IN, dtype=torch.float32) * 0.02).to(torch.bfloat16)
    clone_done: list = []
    for label, bits, sym, strat, gs in SCHEMES:
        if bits not in bits_list:
            continue
        start = len(results)
        bench_layer(label, bits, sym, strat, gs, args.reps, results, W, clone_done)
        for r in results[start:]:
            print(_fmt_row(r), flush=True)
        gc.collect()

    info["loadavg_end"] = list(os.getloadavg())
    info["elapsed_s"] = time.perf_counter() - t_start
    print()
    print(f"# load average at end {info['loadavg_end'][0]:.2f} {info['loadavg_end'][1]:.2f} "
          f"{info['loadavg_end'][2]:.2f}; elapsed {info['elapsed_s']:.0f} s")
    targets = [r for r in results if "target" in r]
    for r in targets:
        print(f"# target {r['op']} int{r['bits']} ({r['what'].split(':')[0]}): "
              f"{r['speedup_median']:.2f}x vs >= {r['target']:.1f}x -> {'PASS' if r['pass'] else 'FAIL'}")

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "shape": [OUT, IN], "reps": args.reps, "bits": bits_list,
                       "command": " ".join(sys.argv), "results": results}, f, indent=1)
        print(f"# wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
