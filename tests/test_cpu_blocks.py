"""The CPU path: blocks of values on worker threads (pack.cpu_map) give the same bits as the
device path (whole-tensor torch ops, what CUDA and meta tensors run) and as compressed-tensors,
for every bit width, both layouts, rows that end inside a word and rows that do not, with
blocks far smaller than the tensor; its torch ops run one thread per worker, so no block waits
at a thread barrier for a descheduled thread (its speed under load: bench_core.py --contended)."""
from __future__ import annotations

import threading

import pytest
import torch

from ctformat import pack, quant
from ctformat.pack import cpu_map, pack_to_int32, unpack_from_int32
from ctformat.quant import compress, decompress, dequantize, quantize
from ctformat.scheme import QuantScheme

ct = pytest.importorskip("compressed_tensors")

from compressed_tensors.compressors import BaseCompressor  # noqa: E402
from compressed_tensors.compressors.pack_quantized import helpers  # noqa: E402
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme  # noqa: E402

CT_PACKED = BaseCompressor.get_value_from_registry("pack-quantized")
# n = 96: rows end on a word in every layout (one stream); 75 and 13: rows end inside a word
SHAPES = [(40, 96), (40, 75), (3, 7, 13), (1, 320)]


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of a few dozen values, so every tensor here spans many blocks with a short last one."""
    monkeypatch.setattr(pack, "_CPU_STEP", 40)
    monkeypatch.setattr(quant, "_ROW_BLOCK_ELEMENTS", 200)
    monkeypatch.setattr(pack, "_workers", lambda: 3)      # more workers than cores: blocks end in any order


def _q(shape, bits, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), shape, dtype=torch.int8, generator=g)


@pytest.mark.parametrize("layout", ["dense", "padded"])
@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_cpu_blocks_give_the_device_path_words(shape, bits, layout, small_blocks):
    q = _q(shape, bits, seed=bits)
    words = pack_to_int32(q, bits, layout=layout)
    assert torch.equal(words, pack._pack_rows(q.view(torch.uint8), bits, layout))
    assert torch.equal(unpack_from_int32(words, bits, shape, layout=layout), q)
    assert torch.equal(pack._unpack_rows(words, bits, shape[-1], layout), q)
    if layout == "dense":
        assert torch.equal(words, helpers.pack_to_int32(q, bits))


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 7])
def test_cpu_blocks_report_the_range_of_the_whole_tensor(bits, small_blocks):
    q = _q((40, 75), bits)
    q[-1, -1], q[20, 3] = 1 << (bits - 1), -(1 << (bits - 1)) - 1     # out of range, in two late blocks
    lo, hi = int(q.min()), int(q.max())
    with pytest.raises(ValueError, match=rf"values span \[{lo}, {hi}\], outside the int{bits}"):
        pack_to_int32(q, bits)


ARGS = [dict(num_bits=4, symmetric=False, strategy="group", group_size=16),
        dict(num_bits=8, symmetric=True, strategy="channel"),
        dict(num_bits=3, symmetric=False, strategy="channel"),
        dict(num_bits=2, symmetric=False, strategy="tensor")]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("args", ARGS, ids=lambda a: f"int{a['num_bits']}-{a['strategy']}-{a['symmetric']}")
def test_cpu_row_blocks_match_compressed_tensors(args, dtype, small_blocks):
    w = (torch.randn(2, 30, 48, generator=torch.Generator().manual_seed(1)) * 0.05).to(dtype)
    scheme = QuantScheme.from_json(args, where="test")
    ct_scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**args))
    ours = compress(w, scheme)
    scale, zp = ours["weight_scale"], ours.get("weight_zero_point")
    sd = {"weight": w, "weight_scale": scale}
    if zp is not None:
        sd["weight_zero_point"] = quantize(w, scheme)[2]
    theirs = CT_PACKED.compress(sd, ct_scheme)
    assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert torch.equal(decompress(ours, scheme), CT_PACKED.decompress(theirs, ct_scheme)["weight"])


@pytest.mark.parametrize("out_dtype", [None, torch.float32, torch.float16])
def test_cpu_row_blocks_equal_whole_tensor_ops(out_dtype, small_blocks):
    """quantize/dequantize by row blocks (with g_idx too) equal the same torch ops on the whole tensor."""
    scheme = QuantScheme.from_json(dict(num_bits=4, symmetric=False, strategy="group", group_size=8), where="test")
    w = (torch.randn(50, 32, generator=torch.Generator().manual_seed(2)) * 0.05).to(torch.bfloat16)
    g_idx = torch.randperm(32, generator=torch.Generator().manual_seed(3)) % 4
    q, scale, zp = quantize(w, scheme, g_idx=g_idx)
    assert torch.equal(q, quant._quantized(w, scale, zp, g_idx, scheme).to(torch.int8))
    whole = quant._dequantized(q, scale, zp, g_idx, scheme)
    assert torch.equal(dequantize(q, scale, zp, g_idx, scheme=scheme, dtype=out_dtype),
                       whole if out_dtype is None else whole.to(out_dtype))


def test_cpu_path_runs_torch_single_threaded_on_workers(monkeypatch):
    """The block jobs run on worker threads whose torch uses one thread (no OpenMP region to
    wait in), take blocks as they free up, and leave the caller's thread count as it was."""
    monkeypatch.setattr(quant, "_ROW_BLOCK_ELEMENTS", 1000)
    seen = []
    real = quant._dequantized

    def spy(*a, **k):
        seen.append((threading.current_thread().name, torch.get_num_threads()))
        return real(*a, **k)

    monkeypatch.setattr(quant, "_dequantized", spy)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        scheme = QuantScheme.from_json(dict(num_bits=4, symmetric=True, strategy="group", group_size=32),
                                       where="test")
        t = compress(torch.randn(64, 256).to(torch.bfloat16), scheme)
        decompress(t, scheme)
        assert len(seen) == -(-64 // (1000 // 256))              # blocks of 3 rows
        assert all(name.startswith("ctformat-cpu") and threads == 1 for name, threads in seen)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_cpu_map_runs_inline_with_one_thread_and_reraises(monkeypatch):
    order = []
    monkeypatch.setattr(pack, "_workers", lambda: 1)
    cpu_map(lambda s: order.append((s, threading.current_thread() is threading.main_thread())), range(0, 6, 2))
    assert order == [(0, True), (2, True), (4, True)]
    monkeypatch.setattr(pack, "_workers", lambda: 2)

    def job(s):
        if s == 3:
            raise KeyError("block 3")

    with pytest.raises(KeyError, match="block 3"):
        cpu_map(job, range(8))
    # where a worker's torch cannot be made single-threaded, torch jobs stay on the calling thread
    monkeypatch.setattr(pack, "_omp_set_num_threads", None)
    order.clear()
    cpu_map(lambda s: order.append((s, threading.current_thread() is threading.main_thread())), range(3),
            torch_ops=True)
    assert order == [(0, True), (1, True), (2, True)]


def test_cpu_blocks_keep_inference_mode():
    scheme = QuantScheme.from_json(dict(num_bits=4, symmetric=False, strategy="group", group_size=128), where="test")
    w = torch.randn(512, 1024).to(torch.bfloat16)
    t = compress(w, scheme)
    with torch.inference_mode():
        assert torch.equal(decompress(t, scheme), decompress(compress(w, scheme), scheme))
