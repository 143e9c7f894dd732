"""GGUF repack throughput against a plain copy of the same bytes, and against llama.cpp's route,
measured side by side in one run.

For each scheme: one module's CT tensors (weight_packed + weight_scale) -> ggml blocks with
ctformat.ggml.encode_module (what convert --to gguf runs per module), against
- a plain copy of the same input bytes into a fresh buffer, numpy (np.copy) and torch (clone);
- llama.cpp's route for the same module: dequantize to float32, then gguf-py's quantize (the
  numpy twin of ggml's quantizer, which convert_hf_to_gguf.py uses) to Q8_0/Q4_0 (--peer).
The repacked blocks are checked against gguf-py's dequantization (== s*(q - z)) first. Runs are
interleaved (copy, repack, copy, ...) and the median of each is reported; the machine may be
shared, so only ratios taken in one run mean anything.

    python benchmarks/bench_gguf.py [--rows 16384] [--cols 8192] [--repeat 7] [--peer]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch

from ctformat.ggml import block_type_for, dequantize_blocks, encode_module
from ctformat.quant import compress, decompress, dequantize
from ctformat.pack import unpack_from_int32
from ctformat.scheme import QuantScheme

SCHEMES = {
    "int4 g32 -> Q4_0": {"num_bits": 4, "symmetric": True, "strategy": "group", "group_size": 32},
    "int4 g128 -> Q4_0": {"num_bits": 4, "symmetric": True, "strategy": "group", "group_size": 128},
    "int8 g128 -> Q8_0": {"num_bits": 8, "symmetric": True, "strategy": "group", "group_size": 128},
    "int4 asym g128 -> Q5_0": {"num_bits": 4, "symmetric": False, "strategy": "group", "group_size": 128},
    "int3 g128 -> Q4_0": {"num_bits": 3, "symmetric": True, "strategy": "group", "group_size": 128},
}


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=16384)
    ap.add_argument("--cols", type=int, default=8192)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--peer", action="store_true", help="also time dequantize + gguf-py quantize (slow)")
    ap.add_argument("--only", default=None, help="run the schemes whose label contains this")
    ap.add_argument("--threads", type=int, default=0, help="codec worker threads (0: one per core, at most 8)")
    args = ap.parse_args()
    if args.threads:
        import ctformat.ggml as ggml
        ggml._workers = lambda: args.threads
    from ctformat.ggml import _workers
    print(f"torch {torch.__version__}, numpy {np.__version__}, {torch.get_num_threads()} torch threads, "
          f"{_workers()} codec threads, "
          f"load {os.getloadavg()[0]:.2f}, module [{args.rows}, {args.cols}]")
    print(f"{'scheme':24s} {'MB in':>6s} {'np copy':>8s} {'clone':>8s} {'repack':>8s} {'GB/s':>5s} "
          f"{'x np copy':>9s} {'x clone':>8s}" + (f" {'peer ms':>9s} {'vs peer':>8s}" if args.peer else ""))
    gen = torch.Generator().manual_seed(0)
    for label, sj in SCHEMES.items():
        if args.only and args.only not in label:
            continue
        scheme = QuantScheme.from_json(sj, where=label)
        w = (torch.randn(args.rows, args.cols, generator=gen) * 0.02).to(torch.bfloat16)
        t = compress(w, scheme)
        del w
        btype = block_type_for(scheme, args.cols)
        raw = encode_module(t, scheme, btype)
        q = unpack_from_int32(t["weight_packed"], scheme.num_bits, (args.rows, args.cols))
        zp = t.get("weight_zero_point")
        if zp is not None:
            zp = unpack_from_int32(zp, scheme.num_bits, (args.rows, t["weight_scale"].shape[-1]), packed_dim=0)
        want = dequantize(q, t["weight_scale"].double(), zp, scheme=scheme)
        assert torch.equal(dequantize_blocks(raw, btype), want), label        # exact before anything is timed
        del q, want, raw
        src = np.concatenate([t[k].reshape(-1).view(torch.uint8).numpy() for k in ("weight_packed", "weight_scale")])
        tsrc = torch.from_numpy(src)
        np_copy, clone, repack = [], [], []
        for _ in range(args.repeat):
            np_copy.append(timed(lambda: src.copy()))
            repack.append(timed(lambda: encode_module(t, scheme, btype)))
            clone.append(timed(lambda: tsrc.clone()))
        c, k, r = (statistics.median(x) for x in (np_copy, clone, repack))
        line = (f"{label:24s} {src.nbytes / 1e6:6.1f} {c * 1e3:8.2f} {k * 1e3:8.2f} {r * 1e3:8.2f} "
                f"{src.nbytes / r / 1e9:5.2f} {c / r:8.2f}x {k / r:7.2f}x")
        if args.peer:
            import gguf
            qtype = gguf.GGMLQuantizationType["Q4_0" if btype.name == "Q4_0" else "Q8_0"]
            peer = timed(lambda: gguf.quants.quantize(decompress(t, scheme, dtype=torch.float32).numpy(), qtype))
            line += f" {peer * 1e3:9.1f} {peer / r:7.1f}x"
        print(line, flush=True)


if __name__ == "__main__":
    main()
