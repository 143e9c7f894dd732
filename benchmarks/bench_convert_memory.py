"""Host memory of `convert --to dense` at Kimi-K2's expert shape: peak RSS must not grow with
the number of experts (the pipeline holds one step read ahead, one computing, one being
written: a few tensors, spec/ctformat.md §1.7).

    python benchmarks/bench_convert_memory.py [--experts 8,24] [--dir /tmp/ctformat-mem] [--json OUT]

Each run writes a checkpoint of E routed experts x (gate_proj, up_proj [2048, 7168],
down_proj [7168, 2048]), int4 symmetric group 32 with bf16 scales, converts it in a fresh
process and reads that process's peak RSS (wait4); a process that only imports ctformat and
torch gives the floor. Prints the bound (the largest tensor in and out, times the tensors in
flight) beside what was measured. `ctformat convert` fixes glibc's mmap threshold (cli/main.py);
MALLOC_MMAP_THRESHOLD_=33554432 in the environment shows the memory without it.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHAPES = {"gate_proj": (2048, 7168), "up_proj": (2048, 7168), "down_proj": (7168, 2048)}
GROUP = 32


def make(root: Path, experts: int) -> int:
    import torch
    from ctformat.writer import CheckpointWriter
    plan, data = [], {}
    g = torch.Generator().manual_seed(0)
    for part, (rows, cols) in SHAPES.items():           # one random tensor per part, reused by every expert
        data[part] = (torch.randint(-2**31, 2**31 - 1, (rows, cols // 8), generator=g, dtype=torch.int32),
                      (torch.rand((rows, cols // GROUP), generator=g) * 0.01 + 1e-4).to(torch.bfloat16))
    for e in range(experts):
        for part, (rows, cols) in SHAPES.items():
            p = f"model.layers.1.mlp.experts.{e}.{part}"
            plan += [(f"{p}.weight_packed", "I32", (rows, cols // 8)), (f"{p}.weight_scale", "BF16", (rows, cols // GROUP)),
                     (f"{p}.weight_shape", "I64", (2,))]
    config = json.loads((ROOT / "fixtures" / "int4-g32" / "config.json").read_text())
    config["quantization_config"]["ignore"] = ["lm_head"]
    with CheckpointWriter(root, plan, max_shard_size=2_000_000_000) as w:
        for name, _, shape in plan:
            part = name.split(".")[-2]
            if name.endswith("packed"):
                w.write(name, data[part][0])
            elif name.endswith("scale"):
                w.write(name, data[part][1])
            else:
                w.write(name, torch.tensor(SHAPES[part]))
        w.close(config)
    return sum(p.stat().st_size for p in root.iterdir())


def peak_rss(argv: list[str]) -> tuple[float, float, float, float]:
    """(seconds, peak RSS, peak anonymous RSS, peak file-backed RSS, in MiB) of a child process.
    Peak RSS comes from wait4; the split is sampled from /proc every 10 ms: file-backed pages
    (the source's memory-mapped shards) are clean page cache the kernel reclaims under
    pressure, anonymous ones are the process's own memory."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    anon = file = 0
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        try:
            fields = dict(line.split(":", 1) for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines())
            anon = max(anon, int(fields["RssAnon"].split()[0]))
            file = max(file, int(fields["RssFile"].split()[0]) + int(fields["RssShmem"].split()[0]))
        except (OSError, KeyError, ValueError):
            pass
        time.sleep(0.01)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(argv)} failed: {proc.stderr.read().decode()[-2000:]}")
    return time.perf_counter() - t0, usage.ru_maxrss / 1024, anon / 1024, file / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts", default="8,24")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/ctformat-mem"))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    _, _, floor, _ = peak_rss([sys.executable, "-c", "import torch, ctformat.convert, time; time.sleep(0.5)"])
    rows, cols = max(SHAPES.values())
    out_mib = rows * cols * 2 / 2**20
    in_mib = (rows * cols // 2 + rows * cols // GROUP * 2) / 2**20
    print(f"floor (anonymous RSS after import torch + ctformat): {floor:.0f} MiB; largest tensor {in_mib:.1f} MiB in, {out_mib:.1f} MiB out "
          f"(bf16); bound: floor + 2 x in (read ahead, computing) + 3 x out (being computed, queued, being "
          f"written) = {floor + 2 * in_mib + 3 * out_mib:.0f} MiB, plus the codec's blocks of 2^18 values", flush=True)
    rows_out = []
    for experts in (int(x) for x in args.experts.split(",")):
        shutil.rmtree(args.dir, ignore_errors=True)
        args.dir.mkdir(parents=True)
        src, out = args.dir / "src", args.dir / "out"
        size = make(src, experts)
        secs, rss, anon, file = peak_rss([sys.executable, "-m", "ctformat", "convert", str(src), str(out), "--to", "dense",
                              "--device", "cpu"])
        out_size = sum(p.stat().st_size for p in out.iterdir())
        row = {"experts": experts, "modules": experts * 3, "in_MB": size / 1e6, "out_MB": out_size / 1e6,
               "seconds": secs, "peak_rss_MiB": rss, "peak_anon_MiB": anon, "peak_file_MiB": file,
               "anon_above_floor_MiB": anon - floor}
        rows_out.append(row)
        print(f"{experts:4d} experts ({experts * 3} modules): {size / 1e6:7.0f} MB in, {out_size / 1e6:7.0f} MB out, "
              f"{secs:6.1f} s, peak RSS {rss:4.0f} MiB: anonymous {anon:4.0f} ({anon - floor:+.0f} over the floor), "
              f"file-backed {file:4.0f}")
    shutil.rmtree(args.dir, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps({"floor_MiB": floor, "largest_in_MiB": in_mib, "largest_out_MiB": out_mib,
                                         "runs": rows_out}, indent=1))


if __name__ == "__main__":
    main()
