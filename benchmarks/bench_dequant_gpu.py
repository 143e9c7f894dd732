"""GPU dequantization, side by side in one run: ctformat's Triton kernels, its torch path,
torch.compile of the closed-form formula, compressed-tensors' own decompression, and a plain
device copy (the bandwidth limit). Workload: eight stacked Mixtral-8x22B experts, 16384 x 6144.

    python benchmarks/bench_dequant_gpu.py [--sweep] [--reps 20] [--json out.json]
    python benchmarks/bench_dequant_gpu.py --check      # tiny shapes on the CPU (Triton's interpreter)

Cases: pack-quantized int4 sym/asym/g_idx g128, int8 g128, int4 with fp16 scales; and, where
ctformat.formats is present, FP8 (channel, 128x128 blocks), NVFP4 and MXFP4.

Bandwidth counts bytes read plus bytes written; "copy" is torch's clone of a tensor the size of
the output, "write only" a fill of such a tensor (the ceiling of a kernel whose traffic is mostly
its output). Every implementation's output is compared bit for bit with ctformat's torch path
(proven equal to compressed-tensors) before it is timed; a mismatch is printed and recorded, and
the run goes on. --sweep first times every kernel variant and block size of the flat and g_idx
kernels on the int4 (sym, asym, g_idx) and int8 cases, keeps the fastest correct one for the rest
of the run and prints them as kernels.py settings. Results go to --json after every case, so a
run cut short still leaves what it measured. --check runs every case on tiny tensors on the CPU
(kernels in Triton's interpreter, torch.compile replaced by the eager formula) to prove the
script itself before a GPU run.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from datetime import date
from pathlib import Path

CHECK = "--check" in sys.argv
if CHECK:
    os.environ.setdefault("TRITON_INTERPRET", "1")      # before anything imports triton

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ctformat.quant import compress, decompress  # noqa: E402
from ctformat.scheme import QuantScheme  # noqa: E402

E, N, K = (2, 256, 512) if CHECK else (8, 16384, 6144)
DEVICE = "cpu" if CHECK else "cuda"
ROUNDS = 1 if CHECK else 5       # timing rounds, interleaved across implementations
INNER = 10                       # calls per timing (see timed)
G128 = {"strategy": "group", "group_size": 128}
BF16, FP16 = torch.bfloat16, torch.float16
PACK_CASES = [("int4 sym g128", {"num_bits": 4, "symmetric": True, **G128}, BF16),
              ("int4 asym g128", {"num_bits": 4, "symmetric": False, **G128}, BF16),
              ("int4 sym g128 g_idx", {"num_bits": 4, "symmetric": True, "actorder": "group", **G128}, BF16),
              ("int8 sym g128", {"num_bits": 8, "symmetric": True, **G128}, BF16),
              ("int4 sym g128 fp16", {"num_bits": 4, "symmetric": True, **G128}, FP16)]
FP8 = {"num_bits": 8, "type": "float", "symmetric": True}
FP_CASES = [("fp8 channel", "float-quantized", {**FP8, "strategy": "channel"}),
            ("fp8 block 128x128", "float-quantized", {**FP8, "strategy": "block", "block_structure": [128, 128]}),
            ("nvfp4", "nvfp4-pack-quantized", {"num_bits": 4, "type": "float", "symmetric": True,
                                               "strategy": "tensor_group", "group_size": 16,
                                               "scale_dtype": "torch.float8_e4m3fn"}),
            ("mxfp4", "mxfp4-pack-quantized", {"num_bits": 4, "type": "float", "symmetric": True,
                                               "strategy": "group", "group_size": 32, "scale_dtype": "torch.uint8"})]
# Sweep grids: (packed words per program, warps) of the flat kernel; (rows, words per row,
# warps) of the "rows" g_idx kernel.
FLAT_GRID = [(512, 4), (512, 8), (1024, 8), (1024, 16), (2048, 8), (2048, 16), (4096, 16)]
ROWS_GRID = [(2, 256, 8), (4, 256, 8), (8, 256, 8), (16, 256, 8), (4, 128, 4), (8, 512, 16)]
if CHECK:
    FLAT_GRID, ROWS_GRID = FLAT_GRID[:1], ROWS_GRID[:1]


# -- timing --------------------------------------------------------------------------------
def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _elapsed_ms(fn, calls: int) -> float:
    if DEVICE != "cuda":
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - t0) * 1e3
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(calls):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b)


def timed(fn, reps: int) -> float:
    """Median milliseconds per fn() after two warm-ups. Each timing spans INNER calls back to
    back, as a streaming converter issues them: the host's launch work for one call then
    overlaps the device's work for the one before, for every implementation alike (one call per
    event pair adds ~30-60 us of Python to a 0.5 ms kernel). Implementations slower than 2 ms,
    where that overhead is noise, are timed one call at a time, and fewer times (about 0.3 s of
    timing each) so slow peers do not eat the device session."""
    if CHECK:               # the interpreter: one call proves the path, its time means nothing
        return _elapsed_ms(fn, 1)
    fn(), fn()
    _sync()
    trial = _elapsed_ms(fn, 1)
    inner = INNER if trial < 2 else 1
    reps = max(3, min(reps, int(300 / max(trial * inner, 1e-3))))
    return statistics.median(_elapsed_ms(fn, inner) / inner for _ in range(reps))


def same(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Bit for bit, NaNs on the same elements (their payloads are not part of the formats)."""
    if got.shape != want.shape or got.dtype != want.dtype:
        return False
    nan = want.isnan()
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[want.element_size()]
    return bool(torch.equal(got.isnan(), nan) and torch.equal(got.view(ints)[~nan], want.view(ints)[~nan]))


def compiled(f):
    return f if CHECK else torch.compile(f, dynamic=False)


# -- closed forms for torch.compile --------------------------------------------------------
def _unpack(words: torch.Tensor, bits: int, dim: int = -1) -> torch.Tensor:
    """int32 words -> signed values along `dim` (-1: columns; -2: zero points along rows)."""
    shifts = torch.arange(0, 32, bits, device=words.device, dtype=torch.int32)
    if dim == -1:
        u = (words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
        return u.flatten(-2) - (1 << (bits - 1))
    u = (words.unsqueeze(-2) >> shifts[:, None]) & ((1 << bits) - 1)        # [.., words, per, G]
    return u.flatten(-3, -2) - (1 << (bits - 1))


def closed_form(s: QuantScheme, rows: int):
    """(q - zp) * scale in the scale dtype, as a function of the stored tensors."""
    bits, gs = s.num_bits, s.group_size

    def f(t):
        q, scale = _unpack(t["weight_packed"], bits), t["weight_scale"]
        x = q.to(scale.dtype)
        if s.has_g_idx:
            col = scale.index_select(-1, t["weight_g_idx"])
            if not s.symmetric:
                x = x - _unpack(t["weight_zero_point"], bits, -2)[..., :rows, :].index_select(
                    -1, t["weight_g_idx"]).to(scale.dtype)
            return x * col
        x = x.unflatten(-1, (-1, gs))
        if not s.symmetric:
            x = x - _unpack(t["weight_zero_point"], bits, -2)[..., :rows, :].to(scale.dtype).unsqueeze(-1)
        return (x * scale.unsqueeze(-1)).flatten(-2)
    return compiled(f)


_E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]


def fp_closed_form(name: str):
    lut = torch.tensor(_E2M1, device=DEVICE)

    def fp8(t):
        q, s = t["weight"], t["weight_scale"]
        if s.shape[-1] == 1:                                   # channel
            return q.to(s.dtype) * s
        x = q.to(s.dtype).unflatten(-1, (-1, 128)).unflatten(-3, (-1, 128))
        return (x * s[..., :, None, :, None]).flatten(-2).flatten(-3, -2)

    def fp4(t):
        p = t["weight_packed"].to(torch.int32)
        v = lut[torch.stack((p & 15, p >> 4), -1).flatten(-2)]
        if "weight_global_scale" in t:                         # NVFP4: FP8 scale over the global scale
            s, gs = t["weight_scale"].float() / t["weight_global_scale"].unsqueeze(-1), 16
        else:                                                  # MXFP4: 2^(e - 127)
            s, gs = torch.exp2(t["weight_scale"].float() - 127), 32
        return (v.unflatten(-1, (-1, gs)) * s.unsqueeze(-1)).flatten(-2).to(torch.bfloat16)
    return compiled(fp8 if name.startswith("fp8") else fp4)


# -- peers ---------------------------------------------------------------------------------
def load_ct():
    try:
        from compressed_tensors.compressors import BaseCompressor
        from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    except ImportError:
        return None

    def make(fmt: str, args: dict):
        a = {k: v for k, v in args.items() if k != "actorder"}
        return (BaseCompressor.get_value_from_registry(fmt),
                QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**a)))
    return make


def load_formats():
    try:
        from ctformat.formats import format_named
        from ctformat.scheme import QuantGroup
    except ImportError:
        return None

    def make(fmt: str, args: dict):
        group = QuantGroup.from_json("bench", {"targets": ["Linear"], "weights": args, "format": fmt}, where="bench")
        return format_named(fmt), group
    return make


# -- cases ---------------------------------------------------------------------------------
def pack_tensors(args: dict, dtype: torch.dtype) -> tuple[QuantScheme, dict]:
    s = QuantScheme.from_json(args, where="bench")
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    w = (torch.randn(E, N, K, device=DEVICE, generator=gen) * 0.02).to(dtype)
    g_idx = None
    if s.has_g_idx:     # act-order: groups of 128 columns in a random column order
        perm = torch.randperm(K, device=DEVICE, generator=gen)
        g_idx = (torch.arange(K, device=DEVICE) // s.group_size)[perm].int()
    t = compress(w, s, g_idx=g_idx)
    return s, t


def pack_case(name: str, args: dict, dtype: torch.dtype, ct) -> tuple[dict, torch.Tensor, dict]:
    s, t = pack_tensors(args, dtype)
    ref = decompress(t, s, kernel="torch")
    impls = {"ctformat triton": lambda: decompress(t, s, kernel="triton"),
             "ctformat torch": lambda: decompress(t, s, kernel="torch"),
             "torch.compile": lambda f=closed_form(s, N): f(t)}
    notes = {}
    if ct is None:
        notes["compressed-tensors"] = "not installed"
    elif s.has_g_idx:
        notes["compressed-tensors"] = "0.20 decompress ignores weight_g_idx (not comparable)"
    else:
        comp, ct_scheme = ct("pack-quantized", args)
        impls["compressed-tensors"] = lambda: comp.decompress(t, ct_scheme)["weight"]
    return t, ref, impls, notes


def _fp_tensors(name: str) -> dict:
    """Stored tensors of a float format, drawn directly (no NaN codes, positive finite scales)."""
    gen = torch.Generator(device=DEVICE).manual_seed(1)

    def randint(lo, hi, shape):
        return torch.randint(lo, hi, shape, device=DEVICE, generator=gen, dtype=torch.int32)

    def bf16_scale(shape):
        return (torch.rand(shape, device=DEVICE, generator=gen) * 0.01 + 1e-3).to(torch.bfloat16)
    if name.startswith("fp8"):
        code = randint(0, 0x7F, (E, N, K)) | (randint(0, 2, (E, N, K)) << 7)     # 0x7F / 0xFF (NaN) excluded
        scale = bf16_scale((E, N, 1) if name == "fp8 channel" else (E, N // 128, K // 128))
        return {"weight": code.to(torch.uint8).view(torch.float8_e4m3fn), "weight_scale": scale}
    packed = randint(0, 256, (E, N, K // 2)).to(torch.uint8)
    if name == "nvfp4":
        scale = randint(0x08, 0x7F, (E, N, K // 16)).to(torch.uint8).view(torch.float8_e4m3fn)
        gscale = torch.rand((E, 1), device=DEVICE, generator=gen) * 3000 + 100
        return {"weight_packed": packed, "weight_scale": scale, "weight_global_scale": gscale}
    return {"weight_packed": packed, "weight_scale": randint(110, 136, (E, N, K // 32)).to(torch.uint8)}


def fp_case(name: str, fmt_name: str, args: dict, ct, formats) -> tuple[dict, torch.Tensor, dict]:
    fmt, group = formats(fmt_name, args)
    t = _fp_tensors(name)
    ref = fmt.decompress(t, group, kernel="torch")
    impls = {"ctformat triton": lambda: fmt.decompress(t, group, kernel="triton"),
             "ctformat torch": lambda: fmt.decompress(t, group, kernel="torch"),
             "torch.compile": lambda f=fp_closed_form(name): f(t)}
    notes = {}
    if ct is None:
        notes["compressed-tensors"] = "not installed"
    else:       # its decompressors take one 2-D weight: one call per expert
        comp, ct_scheme = ct(fmt_name, args)
        key = "weight" if name.startswith("fp8") else "weight_packed"

        def ct_all():
            return [comp.decompress({k: v[e] for k, v in t.items()}, ct_scheme)["weight"] for e in range(E)]
        impls["compressed-tensors"] = ct_all
        notes["compressed-tensors"] = f"one decompress per expert ({key} [N, ...])"
    return t, ref, impls, notes


def run_case(name: str, build, reps: int) -> dict:
    t, ref, impls, notes = build()
    read = sum(v.numel() * v.element_size() for v in t.values())
    size = ref.numel() * ref.element_size()
    out = {"case": name, "bytes_moved": read + size, "notes": notes, "mismatch": []}
    for impl, fn in impls.items():
        got = fn()
        got = torch.stack(got) if isinstance(got, list) else got
        if not same(got, ref):
            out["mismatch"].append(impl)
            print(f"  MISMATCH: {name}: {impl} differs from ctformat's torch path")
        del got
    copy_src = torch.empty_like(ref).normal_() if ref.is_floating_point() else ref.clone()
    impls["copy"] = lambda: copy_src.clone()
    impls["write only (fill)"] = lambda: torch.empty_like(ref).fill_(1.5)
    # Round robin: clock drift over the run hits every implementation alike.
    runs: dict[str, list[float]] = {impl: [] for impl in impls}
    for _ in range(ROUNDS):
        for impl, fn in impls.items():
            runs[impl].append(timed(fn, reps))
    for impl, ts in runs.items():
        ms = statistics.median(ts)
        data = 2 * size if impl == "copy" else size if impl.startswith("write only") else read + size
        out[impl] = {"ms": ms, "GBps": data / ms / 1e6}
    return out


def report(r: dict) -> None:
    tri, copy = r["ctformat triton"], r["copy"]
    print(f"\n{r['case']}: {r['bytes_moved'] / 1e9:.2f} GB moved; copy {copy['GBps']:.0f} GB/s")
    for impl in [k for k in r if isinstance(r[k], dict) and "ms" in r[k]]:
        x = r[impl]
        print(f"  {impl:20s} {x['ms']:9.3f} ms {x['GBps']:7.0f} GB/s  {x['GBps'] / copy['GBps']:5.2f}x copy"
              f"  ctformat is {x['ms'] / tri['ms']:6.2f}x faster")
    for impl, note in r["notes"].items():
        print(f"  {impl:20s} {note}")


def summary_line(r: dict) -> str:
    tri = r["ctformat triton"]
    parts = [f"{tri['GBps'] / r['copy']['GBps']:.2f}x copy"]
    for peer in ("torch.compile", "compressed-tensors"):
        if peer in r:
            parts.append(f"{r[peer]['ms'] / tri['ms']:.2f}x {peer}")
    bad = f"  MISMATCH: {', '.join(r['mismatch'])}" if r["mismatch"] else ""
    return f"  {r['case']:22s} {tri['ms']:8.3f} ms  " + ", ".join(parts) + bad


# -- sweep ---------------------------------------------------------------------------------
def sweep(reps: int, budget_s: float) -> list[dict]:
    """Time every variant and block size on the int4 sym/asym/g_idx and int8 cases; install the
    fastest correct setting of each and print it as kernels.py lines."""
    from ctformat import kernels
    start, rows, chosen = time.monotonic(), [], []
    g = {**G128}
    targets = [("sym", {"num_bits": 4, "symmetric": True, **g}), ("zp", {"num_bits": 4, "symmetric": False, **g}),
               ("g_idx", {"num_bits": 4, "symmetric": True, "actorder": "group", **g}),
               ("sym", {"num_bits": 8, "symmetric": True, **g})]
    for kind, args in targets:
        bits = args["num_bits"]
        if time.monotonic() - start > budget_s:
            print(f"  sweep budget ({budget_s:.0f} s) spent: {kind} int{bits} not swept")
            continue
        s, t = pack_tensors(args, BF16)
        ref = decompress(t, s, kernel="torch")
        configs = [("flat", v, c) for v in ((2, 1) if bits == 8 else (1,)) for c in FLAT_GRID]
        rows_before = kernels.GIDX_ROWS
        if kind == "g_idx":
            configs = [(var, 1, c) for var in ("flat", "flat16") for c in FLAT_GRID]
            configs += [(var, 1, c) for var in ("rows", "rows16") for c in ROWS_GRID]
        best = None
        for variant, vec, cfg in configs:
            if time.monotonic() - start > budget_s:
                print(f"  sweep budget ({budget_s:.0f} s) spent: {kind} int{bits} {variant} {cfg} and later not timed")
                break
            kernels.GIDX = variant if kind == "g_idx" else kernels.GIDX
            kernels.VEC[bits] = vec
            if variant.startswith("rows"):
                kernels.GIDX_ROWS = cfg
            else:
                kernels.FLAT[(kind, bits)] = cfg
            fn = lambda t=t, s=s: decompress(t, s, kernel="triton")   # noqa: E731
            ok = same(fn(), ref)
            ms = timed(fn, max(5, reps // 2)) if ok else None
            row = {"case": kind, "bits": bits, "variant": variant, "vec": vec, "config": list(cfg), "ms": ms, "ok": ok}
            rows.append(row)
            print(f"  sweep {kind} int{bits} {variant:6s} vec={vec} {cfg}: " + (f"{ms:.3f} ms" if ok else "WRONG BITS"))
            if ok and (best is None or ms < best["ms"]):
                best = row
        kernels.GIDX_ROWS = rows_before
        if best is None:
            continue
        kernels.VEC[bits] = best["vec"]
        if kind == "g_idx":
            kernels.GIDX = best["variant"]
        if best["variant"].startswith("rows"):
            kernels.GIDX_ROWS = tuple(best["config"])
            chosen.append(f"GIDX_ROWS = {tuple(best['config'])}")
        else:
            kernels.FLAT[(kind, bits)] = tuple(best["config"])
            chosen.append(f"FLAT[({kind!r}, {bits})] = {tuple(best['config'])}")
        if kind == "g_idx":
            chosen.append(f"GIDX = {best['variant']!r}")
        if bits == 8:
            chosen.append(f"VEC[8] = {best['vec']}")
        print(f"fastest {kind} int{bits}: {best['variant']} vec={best['vec']} {tuple(best['config'])} "
              f"({best['ms']:.3f} ms)")
        del t, ref
    print("kernels.py settings from this sweep:\n    " + "\n    ".join(chosen))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=3 if CHECK else 20)
    ap.add_argument("--json", default=None)
    ap.add_argument("--sweep", action="store_true", help="first time every kernel variant and block size")
    ap.add_argument("--sweep-s", type=float, default=120, help="time allowed for the sweep")
    ap.add_argument("--budget-s", type=float, default=400, help="cases not started by then are skipped")
    ap.add_argument("--check", action="store_true", help="tiny shapes on the CPU, kernels in Triton's interpreter")
    ap.add_argument("--cases", default=None, help="comma-separated case names (default: all)")
    a = ap.parse_args()
    start = time.monotonic()
    ct, formats = load_ct(), load_formats()
    device = "cpu (Triton interpreter)" if CHECK else torch.cuda.get_device_name()
    print(f"{date.today()}  {device}  torch {torch.__version__}  "
          f"compressed-tensors {'yes' if ct else 'not installed'}  ctformat.formats {'yes' if formats else 'absent'}")
    print(f"{E} stacked experts {N}x{K}; GB/s = (bytes read + written) / time"
          + ("; --check: torch.compile replaced by the eager formula" if CHECK else ""))
    doc = {"date": str(date.today()), "device": device, "torch": torch.__version__, "shape": [E, N, K],
           "sweep": [], "results": [], "skipped": []}

    def save():
        if a.json:
            Path(a.json).write_text(json.dumps(doc, indent=2))
    if a.sweep:
        doc["sweep"] = sweep(a.reps, a.sweep_s)
        from ctformat import kernels
        doc["settings"] = {"FLAT": {f"{k}/{b}": v for (k, b), v in kernels.FLAT.items()}, "VEC": kernels.VEC,
                           "GIDX": kernels.GIDX, "GIDX_ROWS": kernels.GIDX_ROWS}
        save()
    builds = [(name, lambda n=name, x=args, d=dtype: pack_case(n, x, d, ct)) for name, args, dtype in PACK_CASES]
    if formats is None:
        print("ctformat.formats is absent: FP8, NVFP4 and MXFP4 cases skipped")
        doc["skipped"] += [{"case": n, "why": "ctformat.formats absent"} for n, _, _ in FP_CASES]
    else:
        builds += [(name, lambda n=name, f=fmt, x=args: fp_case(n, f, x, ct, formats)) for name, fmt, args in FP_CASES]
    wanted = None if a.cases is None else set(a.cases.split(","))
    for name, build in builds:
        if wanted is not None and name not in wanted:
            continue
        if time.monotonic() - start > a.budget_s:
            print(f"\n{name}: skipped, the run's budget ({a.budget_s:.0f} s) is spent")
            doc["skipped"].append({"case": name, "why": "budget"})
            continue
        try:
            r = run_case(name, build, a.reps)
        except Exception as e:          # one broken case must not cost the rest of a device session
            print(f"\n{name}: FAILED {type(e).__name__}: {e}")
            doc["skipped"].append({"case": name, "why": f"{type(e).__name__}: {e}"})
            save()
            continue
        finally:
            if DEVICE == "cuda":
                torch.cuda.empty_cache()
        doc["results"].append(r)
        report(r)
        save()
    print("\nctformat's kernel (best variant) per case:")
    for r in doc["results"]:
        print(summary_line(r))
    print(f"({time.monotonic() - start:.0f} s)")


if __name__ == "__main__":
    main()
