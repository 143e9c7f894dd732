"""Marlin repack on the GPU: the Triton kernel beside a device copy of the same bytes (the
bandwidth limit) and the torch twin (marlin.repack with kernel="torch"), for Mixtral-8x22B's
expert shapes; then end-to-end `convert --to marlin` against the raw read of the same files.

    python benchmarks/bench_marlin.py [--reps 20] [--gb 2] [--json out.json]

Same-run ratios; every timed kernel output is checked equal to the torch twin first.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from ctformat.marlin import repack  # noqa: E402

E, H, I = 8, 6144, 16384       # experts, hidden, intermediate (Mixtral-8x22B)
SHAPES = {"w1/w3 8x[16384, 6144]": (E, I, H), "w2 8x[6144, 16384]": (E, H, I)}


def timed(fn, reps: int) -> float:
    """Median milliseconds of fn() over reps (CUDA events), after two warm-ups."""
    fn(), fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts)


def kernels(reps: int, bits: int) -> dict:
    out = {}
    for name, (e, n, k) in SHAPES.items():
        words = torch.randint(-2**31, 2**31, (e, n, k * bits // 32), dtype=torch.int64, device="cuda").to(torch.int32)
        assert torch.equal(repack(words, bits, kernel="triton"), repack(words, bits, kernel="torch"))
        nbytes = 2 * words.numel() * 4                     # read + write, B is the same size as the input
        r = {"copy_ms": timed(lambda: words.clone(), reps), "kernel_ms": timed(lambda: repack(words, bits), reps),
             "torch_ms": timed(lambda: repack(words, bits, kernel="torch"), reps)}
        r["kernel_GBps"] = nbytes / r["kernel_ms"] / 1e6
        r["copy_GBps"] = nbytes / r["copy_ms"] / 1e6
        r["kernel_vs_copy"] = r["copy_ms"] / r["kernel_ms"]
        r["kernel_vs_torch"] = r["torch_ms"] / r["kernel_ms"]
        out[f"int{bits} {name}"] = r
        del words
        torch.cuda.empty_cache()
    return out


def end_to_end(gb: float) -> dict:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_convert import drop_caches, make
    base = Path("/tmp/ctformat-bench-marlin")
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    modules, size = make(base / "src", gb)
    drop_caches()
    t0 = time.perf_counter()
    for f in sorted((base / "src").glob("*.safetensors")):
        with open(f, "rb") as fh:
            while fh.read(64 << 20):
                pass
    read_s = time.perf_counter() - t0
    drop_caches()
    t0 = time.perf_counter()
    shutil.copytree(base / "src", base / "copy")      # same bytes in and out: the file-I/O bound
    subprocess.run(["sync"], check=True)
    res = {"modules": modules, "input_bytes": size, "raw_read_s": read_s, "copy_s": time.perf_counter() - t0}
    shutil.rmtree(base / "copy")
    for device in ("cuda", "cpu"):
        drop_caches()
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "ctformat", "convert", str(base / "src"), str(base / device), "--to",
                            "marlin", "--device", device, "--json"], check=True, cwd=ROOT, capture_output=True, text=True)
        subprocess.run(["sync"], check=True)
        res[f"process_{device}_s"] = time.perf_counter() - t0            # + Python/torch start-up and the sync
        res[f"convert_{device}_s"] = json.loads(r.stdout)["seconds"]     # the conversion itself
    same = all((base / "cuda" / f.name).read_bytes() == f.read_bytes() for f in (base / "cpu").glob("*.safetensors"))
    res["cuda_output_equals_cpu"] = same
    shutil.rmtree(base, ignore_errors=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--gb", type=float, default=2.0, help="packed checkpoint size for the end-to-end run (0: skip)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    res = {"date": str(date.today()), "device": torch.cuda.get_device_name(), "torch": torch.__version__}
    for bits in (4, 8):
        res.update(kernels(a.reps, bits))
    print(f"{res['date']}  {res['device']}  torch {res['torch']}")
    for name, r in res.items():
        if isinstance(r, dict):
            print(f"{name:32s} kernel {r['kernel_ms']:7.3f} ms ({r['kernel_GBps']:6.0f} GB/s)  copy {r['copy_ms']:7.3f} ms"
                  f"  torch twin {r['torch_ms']:8.3f} ms  -> {r['kernel_vs_copy']:.2f}x copy bandwidth, "
                  f"{r['kernel_vs_torch']:.1f}x the torch twin")
    if a.gb:
        e2e = end_to_end(a.gb)
        res["end_to_end"] = e2e
        size = e2e["input_bytes"]
        print(f"convert --to marlin, {e2e['modules']} modules, {size / 1e9:.2f} GB: raw read "
              f"{size / e2e['raw_read_s'] / 1e9:.2f} GB/s, file copy (read + write + sync) "
              f"{size / e2e['copy_s'] / 1e9:.2f} GB/s; cuda {size / e2e['convert_cuda_s'] / 1e9:.2f} GB/s "
              f"({e2e['convert_cuda_s']:.1f} s; process with start-up and sync {e2e['process_cuda_s']:.1f} s), "
              f"cpu {size / e2e['convert_cpu_s'] / 1e9:.2f} GB/s ({e2e['convert_cpu_s']:.1f} s); "
              f"outputs equal: {e2e['cuda_output_equals_cpu']}")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
