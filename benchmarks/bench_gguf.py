"""GGUF repack throughput against a plain copy of the same bytes, measured in the same run.

For each scheme: one module's CT tensors (weight_packed + weight_scale) -> ggml blocks with
ctformat.ggml.encode_module, against torch's copy of those bytes into a fresh buffer (what a
byte-for-byte conversion would cost), and against llama.cpp's route for the same module
(dequantize to float, then gguf-py's quantize to Q8_0/Q4_0) where it exists. Sizes are larger
than the cache, so the copy is memory-bound. Prints best-of-N times and ratios; the machine may
be shared, so only ratios taken in one run mean anything.

    python benchmarks/bench_gguf.py [--rows 16384] [--cols 8192] [--repeat 5] [--peer]
"""
from __future__ import annotations

import argparse
import time

import torch

from ctformat.ggml import block_type_for, encode_module
from ctformat.quant import compress, decompress
from ctformat.scheme import QuantScheme

SCHEMES = {
    "int4 g128 -> Q4_0": {"num_bits": 4, "symmetric": True, "strategy": "group", "group_size": 128},
    "int4 g32 -> Q4_0": {"num_bits": 4, "symmetric": True, "strategy": "group", "group_size": 32},
    "int8 g128 -> Q8_0": {"num_bits": 8, "symmetric": True, "strategy": "group", "group_size": 128},
    "int4 asym g128 -> Q5_0": {"num_bits": 4, "symmetric": False, "strategy": "group", "group_size": 128},
    "int3 g128 -> Q4_0": {"num_bits": 3, "symmetric": True, "strategy": "group", "group_size": 128},
}


def best(fn, repeat: int) -> float:
    fn()
    out = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        out = min(out, time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=16384)
    ap.add_argument("--cols", type=int, default=8192)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--peer", action="store_true", help="also time dequantize + gguf-py quantize (slow)")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, module [{args.rows}, {args.cols}]")
    print(f"{'scheme':26s} {'MB in':>7s} {'copy ms':>8s} {'repack ms':>9s} {'GB/s':>6s} {'vs copy':>8s}"
          + (f" {'peer ms':>8s} {'vs peer':>8s}" if args.peer else ""))
    gen = torch.Generator().manual_seed(0)
    for label, sj in SCHEMES.items():
        scheme = QuantScheme.from_json(sj, where=label)
        w = (torch.randn(args.rows, args.cols, generator=gen) * 0.02).to(torch.bfloat16)
        t = compress(w, scheme)
        del w
        btype = block_type_for(scheme, args.cols)
        src = torch.cat([t[k].reshape(-1).view(torch.uint8) for k in ("weight_packed", "weight_scale")])
        copy = best(lambda: src.clone(), args.repeat)      # a fresh buffer, as the repack allocates one
        repack = best(lambda: encode_module(t, scheme, btype), args.repeat)
        line = (f"{label:26s} {src.numel() / 1e6:7.1f} {copy * 1e3:8.2f} {repack * 1e3:9.2f} "
                f"{src.numel() / repack / 1e9:6.2f} {copy / repack:7.2f}x")
        if args.peer:
            import gguf
            qtype = gguf.GGMLQuantizationType[btype.name if btype.name in ("Q4_0", "Q8_0") else "Q8_0"]
            peer = best(lambda: gguf.quants.quantize(decompress(t, scheme, dtype=torch.float32).numpy(), qtype), 1)
            line += f" {peer * 1e3:8.1f} {peer / repack:7.1f}x"
        print(line)


if __name__ == "__main__":
    main()
