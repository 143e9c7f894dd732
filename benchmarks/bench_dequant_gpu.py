"""GPU dequantization, side by side in one run: ctformat's Triton kernel, its torch path,
torch.compile of a naive unpack-and-scale, compressed-tensors' decompress, and a plain device
copy (the bandwidth limit). Workload: eight stacked Mixtral-8x22B experts, 16384 x 6144.

    python benchmarks/bench_dequant_gpu.py [--reps 20] [--json out.json]

Bandwidth counts bytes read plus bytes written; "copy" is torch's clone of a bf16 tensor the
size of the output, "write only" a fill of such a tensor (the ceiling of a kernel whose traffic
is mostly its output). Every implementation's output is checked equal to ctformat's torch path
(proven equal to compressed-tensors) before it is timed.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ctformat.quant import compress, decompress  # noqa: E402
from ctformat.scheme import QuantScheme  # noqa: E402

E, N, K = 8, 16384, 6144
ROUNDS = 5           # timing rounds, interleaved across implementations
INNER = 10           # calls per timing (see timed)


def timed(fn, reps: int) -> float:
    """Median milliseconds per fn() over reps, CUDA events, after two warm-ups. Each timing
    spans INNER calls back to back, as a streaming converter issues them: the host's launch
    work for one call then overlaps the device's work for the one before, for every
    implementation alike (one call per event pair adds ~30-60 us of Python to a 0.5 ms kernel).
    Implementations slower than 2 ms, where that overhead is noise, are timed one call at a time."""
    fn(), fn()
    ts = []
    inner = 1
    for i in range(reps + 1):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(inner):
            fn()
        b.record()
        torch.cuda.synchronize()
        if i == 0:      # a trial call picks inner
            inner = INNER if a.elapsed_time(b) < 2 else 1
        else:
            ts.append(a.elapsed_time(b) / inner)
    return statistics.median(ts)


def naive(bits: int, gs: int):
    shifts = torch.arange(0, 32, bits, device="cuda", dtype=torch.int32)

    def f(packed, scale):
        q = ((packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).flatten(-2) - (1 << (bits - 1))
        return (q.to(scale.dtype).unflatten(-1, (-1, gs)) * scale.unsqueeze(-1)).flatten(-2)
    return f


def case(name: str, args: dict, reps: int, ct, dtype=torch.bfloat16) -> dict:
    s = QuantScheme.from_json(args, where=name)
    gen = torch.Generator(device="cuda").manual_seed(0)
    w = (torch.randn(E, N, K, device="cuda", generator=gen) * 0.02).to(dtype)
    g_idx = (torch.arange(K, device="cuda") % (K // 128)).int() if s.has_g_idx else None
    t = compress(w, s, g_idx=g_idx)
    del w
    ref = decompress(t, s, kernel="torch")
    read = sum(v.numel() * v.element_size() for v in t.values())
    moved = read + ref.numel() * ref.element_size()
    out = {"case": name, "bytes_moved": moved}
    impls = {"ctformat triton": lambda: decompress(t, s, kernel="triton"),
             "ctformat torch": lambda: decompress(t, s, kernel="torch")}
    if not s.has_g_idx and s.symmetric:
        impls["torch.compile naive"] = lambda f=torch.compile(naive(s.num_bits, s.group_size), dynamic=False): f(
            t["weight_packed"], t["weight_scale"])
    if ct is not None and not s.has_g_idx:
        comp, ct_scheme = ct(args)
        impls["compressed-tensors"] = lambda: comp.decompress(t, ct_scheme)["weight"]
    for impl, fn in impls.items():
        got = fn()
        assert torch.equal(got, ref), (name, impl)
        del got
    copy_src = torch.empty_like(ref).normal_()
    impls["copy"] = lambda: copy_src.clone()
    impls["write only (fill)"] = lambda: torch.empty_like(ref).fill_(1.5)
    # Round robin: clock drift over the run hits every implementation alike.
    runs: dict[str, list[float]] = {impl: [] for impl in impls}
    for _ in range(ROUNDS):
        for impl, fn in impls.items():
            runs[impl].append(timed(fn, reps))
    for impl, ts in runs.items():
        ms = statistics.median(ts)
        size = ref.numel() * ref.element_size()
        data = 2 * size if impl == "copy" else size if impl.startswith("write only") else moved
        out[impl] = {"ms": ms, "GBps": data / ms / 1e6}
    return out


def sweep(reps: int) -> None:
    """Tune the flat kernel (symmetric int4/int8) and the tiled kernel (asymmetric int4);
    install the fastest settings for the rest of the run."""
    from ctformat import kernels
    g = {"strategy": "group", "group_size": 128}
    for args in ({"num_bits": 4, "symmetric": True, **g}, {"num_bits": 4, "symmetric": False, **g}):
        s = QuantScheme.from_json(args, where="sweep")
        w = (torch.randn(E, N, K, device="cuda") * 0.02).to(torch.bfloat16)
        t = compress(w, s)
        del w
        best = None
        if args["symmetric"]:
            for block_w in (256, 512, 1024, 2048, 4096):
                for warps in (4, 8, 16):
                    if block_w < 32 * warps:
                        continue
                    kernels.FLAT.update(block_w=block_w, warps=warps)
                    ms = timed(lambda: decompress(t, s, kernel="triton"), reps)
                    print(f"  flat block_w={block_w} warps={warps}: {ms:.3f} ms")
                    best = min(best or (ms, block_w, warps), (ms, block_w, warps))
            kernels.FLAT.update(block_w=best[1], warps=best[2])
            print(f"fastest flat: block_w={best[1]} warps={best[2]} ({best[0]:.3f} ms)")
        else:
            for rows in (4, 8, 16, 32):
                for words in (32, 64, 128):
                    for warps in (4, 8):
                        kernels._BLOCKS[4] = (rows, words, warps)
                        ms = timed(lambda: decompress(t, s, kernel="triton"), reps)
                        print(f"  tiled rows={rows} words={words} warps={warps}: {ms:.3f} ms")
                        best = min(best or (ms, rows, words, warps), (ms, rows, words, warps))
            kernels._BLOCKS[4] = best[1:]
            print(f"fastest tiled int4: {best[1:]} ({best[0]:.3f} ms)")
        del t


def load_ct():
    try:
        from compressed_tensors.compressors import BaseCompressor
        from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    except ImportError:
        return None
    comp = BaseCompressor.get_value_from_registry("pack-quantized")

    def make(args):
        a = {k: v for k, v in args.items() if k != "actorder"}
        return comp, QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**a))
    return make


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--json", default=None)
    ap.add_argument("--sweep", action="store_true", help="first time int4 tile shapes and keep the fastest")
    a = ap.parse_args()
    if a.sweep:
        sweep(a.reps)
    ct = load_ct()
    g = {"strategy": "group", "group_size": 128}
    bf16, fp16 = torch.bfloat16, torch.float16
    cases = [("int4 sym g128", {"num_bits": 4, "symmetric": True, **g}, bf16),
             ("int8 sym g128", {"num_bits": 8, "symmetric": True, **g}, bf16),
             ("int4 asym g128", {"num_bits": 4, "symmetric": False, **g}, bf16),
             ("int4 sym g128 g_idx", {"num_bits": 4, "symmetric": True, "actorder": "group", **g}, bf16),
             ("int4 sym g128 fp16", {"num_bits": 4, "symmetric": True, **g}, fp16),
             ("int8 sym g128 fp16", {"num_bits": 8, "symmetric": True, **g}, fp16)]
    print(f"{date.today()}  {torch.cuda.get_device_name()}  torch {torch.__version__}  "
          f"compressed-tensors {'yes' if ct else 'not installed'}")
    print(f"{E} stacked experts {N}x{K}, output in the scale dtype; GB/s = (bytes read + written) / time")
    results = []
    for name, args, dtype in cases:
        r = case(name, args, a.reps, ct, dtype)
        results.append(r)
        tri = r["ctformat triton"]
        print(f"\n{name}: {r['bytes_moved'] / 1e9:.2f} GB moved; copy {r['copy']['GBps']:.0f} GB/s")
        for impl in [k for k in r if isinstance(r[k], dict)]:
            x = r[impl]
            print(f"  {impl:22s} {x['ms']:8.3f} ms {x['GBps']:8.0f} GB/s  {x['GBps'] / r['copy']['GBps']:5.2f}x copy"
                  f"  triton is {x['ms'] / tri['ms']:6.2f}x faster")
    if a.json:
        Path(a.json).write_text(json.dumps({"date": str(date.today()), "device": torch.cuda.get_device_name(),
                                            "torch": torch.__version__, "results": results}, indent=2))


if __name__ == "__main__":
    main()
