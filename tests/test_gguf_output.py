"""GGUFOutput (spec/gguf.md §6) read back by gguf-py's GGUFReader, and the plan's refusals (§7)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from ctformat.errors import GGUFRefusal, OutputExistsError, SpecError, WriterError
from ctformat.gguf_writer import GGUFOutput
from gguf_models import write_model
from gguf_peers import float64_weight, need, write_gguf

gguf = need("gguf")
need("sentencepiece")

PLAN = [("a.weight", "Q4_0", (4, 64)), ("b.weight", "F32", (3,)), ("c.weight", "BF16", (2, 5))]


def tensors():
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, 256, (4, 36), generator=gen, dtype=torch.uint8), torch.randn(3, generator=gen),
            torch.randn(2, 5, generator=gen).to(torch.bfloat16)]


def meta(w):
    w.add_block_count(7)


def test_round_trip(tmp_path):
    out = tmp_path / "x.gguf"
    with GGUFOutput(out, "llama", PLAN, meta) as w:
        for (name, _, _), t in zip(PLAN, tensors()):
            w.write(name, t)
        assert w.close() == [out]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.gguf"]       # no temporary folder left
    r = gguf.GGUFReader(out)
    assert r.fields["llama.block_count"].contents() == 7
    assert r.fields["general.architecture"].contents() == "llama"
    got = {t.name: t for t in r.tensors}
    for (name, kind, shape), t in zip(PLAN, tensors()):
        assert got[name].tensor_type.name == kind and list(got[name].shape) == list(shape)[::-1]
        assert bytes(got[name].data.tobytes()) == t.contiguous().view(torch.uint8).numpy().tobytes()
        assert got[name].data_offset % 32 == 0


def test_out_of_plan_and_failure_leave_nothing(tmp_path):
    out = tmp_path / "x.gguf"
    t = tensors()
    with pytest.raises(WriterError, match=r"expected a.weight Q4_0 \[4, 36\] torch.uint8, got b.weight"):
        with GGUFOutput(out, "llama", PLAN) as w:
            w.write("b.weight", t[1])
    with pytest.raises(WriterError, match=r"expected a.weight .* got a.weight \[4, 18\]"):
        with GGUFOutput(out, "llama", PLAN) as w:
            w.write("a.weight", t[0][:, :18])
    with pytest.raises(WriterError, match=r"close\(\) after 1 of 3 planned tensors"):
        with GGUFOutput(out, "llama", PLAN) as w:
            w.write("a.weight", t[0])
            w.close()
    with pytest.raises(RuntimeError, match="boom"):
        with GGUFOutput(out, "llama", PLAN) as w:
            w.write("a.weight", t[0])
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_tensor_in_pieces_along_its_first_axis(tmp_path):
    """A stack written piece by piece is byte-identical to the same stack written whole; pieces
    past the stack, a later tensor while one is open, or an unfinished stack are refused."""
    plan = [("s.weight", "Q4_0", (3, 4, 64)), ("b.weight", "F32", (3,))]
    gen = torch.Generator().manual_seed(1)
    stack, b = torch.randint(0, 256, (3, 4, 36), generator=gen, dtype=torch.uint8), torch.randn(3, generator=gen)
    with GGUFOutput(tmp_path / "whole.gguf", "llama", plan, meta) as w:
        w.write("s.weight", stack)
        w.write("b.weight", b)
        w.close()
    with GGUFOutput(tmp_path / "pieces.gguf", "llama", plan, meta) as w:
        w.write("s.weight", stack[:1])
        w.write("s.weight", stack[1:])
        w.write("b.weight", b)
        w.close()
    assert (tmp_path / "pieces.gguf").read_bytes() == (tmp_path / "whole.gguf").read_bytes()
    out = tmp_path / "bad.gguf"
    with pytest.raises(WriterError, match=r"expected s.weight Q4_0 \[3, 4, 36\] torch.uint8 \(rows 2..\), got s.weight "
                                          r"\[2, 4, 36\]"):
        with GGUFOutput(out, "llama", plan) as w:
            w.write("s.weight", stack[:2])
            w.write("s.weight", stack[1:])
    with pytest.raises(WriterError, match=r"\(rows 1..\), got b.weight"):
        with GGUFOutput(out, "llama", plan) as w:
            w.write("s.weight", stack[:1])
            w.write("b.weight", b)
    with pytest.raises(WriterError, match=r"close\(\) after 0 of 2 planned tensors"):
        with GGUFOutput(out, "llama", plan) as w:
            w.write("s.weight", stack[:2])
            w.close()
    assert not out.exists()


def test_expert_stacks_equal_the_stack_of_their_experts(tmp_path):
    """Each ffn_*_exps tensor, written expert by expert, is the stack of each expert's blocks
    (the whole-tensor construction), for both naming eras and the F32 fallback."""
    from ctformat.checkpoint import open_checkpoint
    from ctformat.ggml import block_type_for, encode_module
    g16 = {"num_bits": 4, "symmetric": True, "strategy": "group", "group_size": 16}
    for arch, sj in (("mixtral", None), ("mixtral_ct019", None), ("mixtral", g16)):
        ct = write_model(arch, tmp_path / f"{arch}{bool(sj)}", quantized=True, scheme_json=sj)
        out = tmp_path / f"{arch}{bool(sj)}.gguf"
        write_gguf(ct, out, dequantize_unmappable=sj is not None)
        got = {t.name: t for t in gguf.GGUFReader(out).tensors}
        ckpt = open_checkpoint(ct)
        mods = ckpt.modules()
        part = "w1" if arch == "mixtral" else "gate_proj"
        for layer in range(2):
            experts = [mods[f"model.layers.{layer}.block_sparse_moe.experts.{e}.{part}"] for e in range(4)]
            if sj is None:
                want = torch.stack([encode_module(ckpt.load_module(m), m.scheme, block_type_for(m.scheme, 64))
                                    for m in experts])
            else:
                want = torch.stack([float64_weight(ckpt.load_module(m), m.scheme, "dense").float() for m in experts])
            t = got[f"blk.{layer}.ffn_gate_exps.weight"]
            assert t.tensor_type.name == ("Q4_0" if sj is None else "F32") and list(t.shape) == [64, 96, 4]
            assert t.data.tobytes() == want.contiguous().view(torch.uint8).numpy().tobytes()


_PEAK = """
import sys
from ctformat.to_gguf import convert_to_gguf
def status(key):      # kB; VmHWM is this process's peak (ru_maxrss would carry the parent's across exec)
    return int(next(line for line in open("/proc/self/status") if line.startswith(key)).split()[1])
before = status("VmRSS")
convert_to_gguf(sys.argv[1], sys.argv[2], device="cpu")
print(status("VmHWM") - before)
"""


def test_expert_stack_memory_does_not_grow_with_the_expert_count(tmp_path):
    """Peak memory of exporting a layer of 8 and of 32 experts (each part's stack 4.5 and
    18 MiB of Q4_0) grows by less than one stack of 8, since a stack is read, encoded and written
    expert by expert. (Whole-stack steps, read ahead and queued, measured 29 -> 83 MiB here.)"""
    import os
    import subprocess
    import sys
    sizes = dict(hidden_size=1024, intermediate_size=1024, num_hidden_layers=1, num_attention_heads=8,
                 num_key_value_heads=8, head_dim=128)
    growth = {}
    for n in (8, 32):
        ct = write_model("mixtral", tmp_path / f"e{n}", quantized=True, tokenizer=False, num_local_experts=n, **sizes)
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")   # freed buffers leave RSS
        run = subprocess.run([sys.executable, "-c", _PEAK, str(ct), str(tmp_path / f"e{n}.gguf")], env=env,
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr
        growth[n] = int(run.stdout.split()[-1]) / 1024       # MiB above the RSS before the conversion
        assert (tmp_path / f"e{n}.gguf").stat().st_size > n * 3 * 1024 * 32 * 18
    assert growth[32] - growth[8] < 4.5, growth


def test_existing_output_refused_unless_force(tmp_path):
    out = tmp_path / "x.gguf"
    out.write_bytes(b"old")
    with pytest.raises(OutputExistsError, match="already exists"):
        GGUFOutput(out, "llama", PLAN)
    assert out.read_bytes() == b"old" and len(list(tmp_path.iterdir())) == 1
    with GGUFOutput(out, "llama", PLAN, force=True) as w:
        for (name, _, _), x in zip(PLAN, tensors()):
            w.write(name, x)
        w.close()
    assert out.read_bytes()[:4] == b"GGUF"


def test_split_max_size(tmp_path):
    ct = write_model("mixtral", tmp_path / "mixtral", quantized=True)
    write_gguf(ct, tmp_path / "one.gguf")
    write_gguf(ct, tmp_path / "split.gguf", split_max_size=20_000)
    shards = sorted(p.name for p in tmp_path.glob("split*.gguf"))
    n = len(shards)
    assert n > 2 and shards == [f"split-{k:05d}-of-{n:05d}.gguf" for k in range(1, n + 1)]
    one = {t.name: t.data.tobytes() for t in gguf.GGUFReader(tmp_path / "one.gguf").tensors}
    seen = {}
    for k, name in enumerate(shards):
        r = gguf.GGUFReader(tmp_path / name)
        assert r.fields["split.no"].contents() == k and r.fields["split.count"].contents() == n
        assert r.fields["split.tensors.count"].contents() == len(one)
        assert ("llama.block_count" in r.fields) == (k == 0)
        assert sum(t.n_bytes for t in r.tensors) <= 20_000 or len(r.tensors) == 1
        seen |= {t.name: t.data.tobytes() for t in r.tensors}
    assert seen == one


def _edit_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def test_plan_refusals(tmp_path):
    ct = write_model("llama", tmp_path / "llama", quantized=True)
    bad = tmp_path / "bad"
    shutil.copytree(ct, bad)
    _edit_config(bad, architectures=["GPT2LMHeadModel"])
    with pytest.raises(GGUFRefusal, match=r"^config.json: architecture 'GPT2LMHeadModel' .*\[GCV-01\]$"):
        write_gguf(bad, tmp_path / "o.gguf")
    with pytest.raises(GGUFRefusal, match=r"outtype 'q8_0' .*\[GCV-06\]"):
        write_gguf(ct, tmp_path / "o.gguf", outtype="q8_0")
    qwen = write_model("qwen2", tmp_path / "qwen2", quantized=True)
    tok = json.loads((qwen / "tokenizer.json").read_text())
    tok["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\s+|\w+"
    (qwen / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(GGUFRefusal, match=r"tokenizer.json: BPE tokenizer .*--tokenizer-pre.*\[GCV-11\]"):
        write_gguf(qwen, tmp_path / "o.gguf")
    write_gguf(qwen, tmp_path / "o.gguf", tokenizer_pre="qwen2")
    assert gguf.GGUFReader(tmp_path / "o.gguf").fields["tokenizer.ggml.pre"].contents() == "qwen2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "llama", "o.gguf", "qwen2"]


def test_missing_expert_refused(tmp_path):
    from ctformat.checkpoint import open_checkpoint
    from ctformat.writer import save_checkpoint
    ct = write_model("mixtral", tmp_path / "mixtral", quantized=True)
    ckpt = open_checkpoint(ct)
    kept = {n: ckpt.load(n) for n in ckpt.tensors if ".experts.3." not in n}
    save_checkpoint(tmp_path / "gap", kept, ckpt.config)
    shutil.copy(ct / "tokenizer.model", tmp_path / "gap" / "tokenizer.model")
    with pytest.raises(GGUFRefusal, match=r"^model.layers.0.block_sparse_moe.experts.\*.gate_proj: experts \[0, 1, 2\] "
                                          r"are not 0..3 \(config.json says 4\) \[GCV-10\]$"):
        write_gguf(tmp_path / "gap", tmp_path / "o.gguf")
    assert not (tmp_path / "o.gguf").exists()


def test_dequantize_unmappable_writes_exact_f32(tmp_path):
    """group_size 16 has no ggml block type (GCV-02); with dequantize_unmappable the module is
    F32, equal to float64 s*q (exact in float32)."""
    from ctformat.checkpoint import open_checkpoint
    sj = {"num_bits": 4, "symmetric": True, "strategy": "group", "group_size": 16}
    ct = write_model("llama", tmp_path / "llama", quantized=True, scheme_json=sj)
    with pytest.raises(GGUFRefusal, match=r"group_size 16.*\[GCV-02\]"):
        write_gguf(ct, tmp_path / "o.gguf")
    result = write_gguf(ct, tmp_path / "o.gguf", dequantize_unmappable=True)
    assert "Q4_0" not in result.details["ggml_types"] and len(result.details["dequantized_modules"]) == 14
    r = {t.name: t for t in gguf.GGUFReader(tmp_path / "o.gguf").tensors}
    ckpt = open_checkpoint(ct)
    m = ckpt.modules()["model.layers.0.self_attn.v_proj"]
    want = float64_weight(ckpt.load_module(m), m.scheme, "dense")
    got = r["blk.0.attn_v.weight"]
    assert got.tensor_type.name == "F32"
    assert np.array_equal(np.asarray(got.data, dtype=np.float64).reshape(want.shape), want.numpy())


def test_read_back_and_file_rules(tmp_path):
    """open_gguf: values equal float64 s*q; split sets through any shard; GGUF-12 on bad files."""
    from ctformat.checkpoint import open_checkpoint
    from ctformat.gguf_read import open_gguf
    ct = write_model("mixtral", tmp_path / "mixtral", quantized=True)
    write_gguf(ct, tmp_path / "split.gguf", split_max_size=20_000)
    shards = sorted(tmp_path.glob("split-*.gguf"))
    g = open_gguf(shards[-1])
    assert g.arch == "llama" and len(g.files) == len(shards) and len(g.tensors) == 23
    ckpt = open_checkpoint(ct)
    m = ckpt.modules()["model.layers.1.self_attn.o_proj"]
    assert torch.equal(g.values("blk.1.attn_output.weight"), float64_weight(ckpt.load_module(m), m.scheme, "dense"))
    v, d, _ = g.codes("blk.1.attn_output.weight")
    assert v.shape == (64, 64) and d.dtype == torch.float16
    shards[1].unlink()
    with pytest.raises(SpecError, match=rf"^{shards[1].name}: shard {shards[1].name} of the split set is missing \[GGUF-06\]$"):
        open_gguf(shards[0])
    write_gguf(ct, tmp_path / "one.gguf")
    raw = (tmp_path / "one.gguf").read_bytes()
    (tmp_path / "bad.gguf").write_bytes(b"GGUX" + raw[4:])
    with pytest.raises(SpecError, match=r"^bad.gguf: magic is b'GGUX', not b'GGUF': not a GGUF file \[GGUF-01\]$"):
        open_gguf(tmp_path / "bad.gguf")
    (tmp_path / "short.gguf").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(SpecError, match=r"^short.gguf: blk.*: data \[.*\) lies past the end of the file .*\[GGUF-05\]$"):
        open_gguf(tmp_path / "short.gguf")
    (tmp_path / "shorter.gguf").write_bytes(raw[:200])
    with pytest.raises(SpecError, match=r"^shorter.gguf: header is truncated: .*\[GGUF-02\]$"):
        open_gguf(tmp_path / "shorter.gguf")


def test_allow_lossy_reports_count_and_error(tmp_path):
    """A bf16 scale fp16 cannot hold: GCV-04 (nothing written), or with allow_lossy the count
    and the largest relative error, and d = fp16(s) in the file."""
    from ctformat.checkpoint import open_checkpoint
    from ctformat.writer import save_checkpoint
    ct = write_model("llama", tmp_path / "llama", quantized=True)
    ckpt = open_checkpoint(ct)
    t = {n: ckpt.load(n) for n in ckpt.tensors}
    s = t["model.layers.1.mlp.down_proj.weight_scale"]
    s[5, 2] = 2.0 ** -20 * 1.5078125
    save_checkpoint(tmp_path / "tiny", t, ckpt.config)
    shutil.copy(ct / "tokenizer.model", tmp_path / "tiny" / "tokenizer.model")
    with pytest.raises(GGUFRefusal, match=r"^model.layers.1.mlp.down_proj: 1 of 256 scales change in fp16, the first "
                                          r"at \[5, 2\] .*\[GCV-04\]$"):
        write_gguf(tmp_path / "tiny", tmp_path / "o.gguf")
    assert not (tmp_path / "o.gguf").exists()
    result = write_gguf(tmp_path / "tiny", tmp_path / "o.gguf", allow_lossy=True)
    count, rel = result.details["lossy_scales"], result.details["lossy_max_rel_error"]
    exact = 2.0 ** -20 * 1.5078125
    assert count == 1 and rel == pytest.approx(abs(float(torch.tensor(exact).half()) - exact) / exact)
    d = {x.name: x for x in gguf.GGUFReader(tmp_path / "o.gguf").tensors}["blk.1.ffn_down.weight"].data
    assert d.reshape(64, 4, 18)[5, 2, :2].view(np.float16)[0] == np.float16(exact)      # group 2 = block 2 (gs 32)


def test_recycled_buffers_write_the_bytes_fresh_memory_writes(tmp_path):
    """convert_to_gguf reads and encodes into buffers handed back after each write; the same plan
    run with fresh memory for every tensor writes the same file (a buffer reused too early, or a
    block field left stale from the module before, would differ). Llama permutes q/k rows into a
    second buffer; mixtral writes stacks expert by expert; asym g32 goes through Q5_0."""
    from ctformat.checkpoint import open_checkpoint
    from ctformat.pipeline import ConvertResult, run_steps
    from ctformat.to_gguf import convert_to_gguf, gguf_plan
    asym = {"num_bits": 4, "symmetric": False, "strategy": "group", "group_size": 32}
    for arch, sj in (("llama", None), ("mixtral", None), ("qwen3", asym)):
        ct = write_model(arch, tmp_path / f"{arch}", quantized=True, scheme_json=sj, num_hidden_layers=3)
        recycled, fresh = tmp_path / f"{arch}-r.gguf", tmp_path / f"{arch}-f.gguf"
        convert_to_gguf(ct, recycled, device="cpu")
        ckpt = open_checkpoint(ct)
        plan = gguf_plan(ckpt)
        with GGUFOutput(fresh, plan.arch, plan.entries, plan.metadata) as w:
            run_steps(ckpt, plan.steps, w, torch.device("cpu"), ConvertResult("gguf", "repacked", str(fresh), "cpu"))
            w.close()
        assert recycled.read_bytes() == fresh.read_bytes(), arch
        assert plan.buffers._issued, "the fresh run's steps took buffers and never gave them back"


def test_buffers_take_back_only_their_own_whole_buffers():
    from ctformat.pipeline import Buffers
    pool = Buffers(span=2)
    a = pool.take(64)
    pool.give([a[8:], torch.empty(64, dtype=torch.uint8)])      # a view into it, a stranger: neither kept
    assert pool.take(64).data_ptr() != a.data_ptr()
    pool.give([a.view(torch.float32).view(4, 4)])               # the whole buffer, seen as any dtype/shape
    assert pool.take(64).data_ptr() == a.data_ptr()
    bufs = [pool.take(64) for _ in range(3)]
    pool.give(bufs)                                             # at most 2 x 64 bytes free: the oldest goes
    assert {pool.take(64).data_ptr() for _ in range(3)} & {b.data_ptr() for b in bufs} == {b.data_ptr() for b in bufs[1:]}


@pytest.mark.parametrize("kernel", ["copy_file_range", "pread/pwrite"])
def test_tensors_as_they_are_copied_file_to_file(tmp_path, monkeypatch, kernel):
    """Tensors written with the bytes they have (bf16 embedding, lm_head, norms under --outtype
    bf16) go file to file through GGUFOutput.copy_range, never read into memory: the file equals
    the one written through memory (copy_range absent), with copy_file_range and with the
    pread/pwrite fallback (a filesystem that refuses it); a split set too."""
    import errno

    import ctformat.gguf_writer as gw
    from ctformat.pipeline import SourceRange
    ct = write_model("llama", tmp_path / "llama", quantized=True, num_hidden_layers=2)
    calls = []
    real = GGUFOutput.copy_range

    def counted(self, name, src):
        calls.append((name, src))
        return real(self, name, src)
    if kernel != "copy_file_range":
        def refuse(*a):
            raise OSError(errno.EXDEV, "cross-device")
        monkeypatch.setattr(gw.os, "copy_file_range", refuse, raising=False)
    monkeypatch.setattr(GGUFOutput, "copy_range", counted)
    write_gguf(ct, tmp_path / "ranged.gguf")
    write_gguf(ct, tmp_path / "ranged-split.gguf", split_max_size=20_000)
    ranged = [n for n, _ in calls]
    assert "token_embd.weight" in ranged and "output_norm.weight" not in ranged      # bf16 norms become F32
    assert all(isinstance(s, SourceRange) and s.path.parent == ct for _, s in calls)
    monkeypatch.delattr(GGUFOutput, "copy_range")
    write_gguf(ct, tmp_path / "memory.gguf")
    write_gguf(ct, tmp_path / "memory-split.gguf", split_max_size=20_000)
    assert (tmp_path / "ranged.gguf").read_bytes() == (tmp_path / "memory.gguf").read_bytes()
    split = sorted(tmp_path.glob("ranged-split-*.gguf"))
    assert len(split) > 1
    for f in split:
        assert f.read_bytes() == (tmp_path / f.name.replace("ranged", "memory")).read_bytes()


def test_copy_range_follows_the_plan(tmp_path):
    from ctformat.pipeline import SourceRange
    src = tmp_path / "src.bin"
    data = torch.randn(2, 5).to(torch.bfloat16)
    src.write_bytes(b"x" * 7 + data.view(torch.uint8).numpy().tobytes())
    plan = [("c.weight", "BF16", (2, 5))]
    with GGUFOutput(tmp_path / "x.gguf", "llama", plan, meta) as w:
        with pytest.raises(WriterError, match="expected c.weight BF16 \\[2, 5\\] \\(20 bytes\\), got c.weight \\(19"):
            w.copy_range("c.weight", SourceRange(src, 7, 19))
        w.copy_range("c.weight", SourceRange(src, 7, 20))
        w.close()
    got = {t.name: t for t in gguf.GGUFReader(tmp_path / "x.gguf").tensors}["c.weight"]
    assert got.data.tobytes() == data.view(torch.uint8).numpy().tobytes()
