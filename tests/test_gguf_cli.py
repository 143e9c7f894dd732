"""convert --to gguf, inspect and validate of .gguf through the command line; the header reader
against gguf-py's GGUFReader; the plan's intentional drops."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import BAD, cli
from ctformat.gguf_header import open_gguf_model
from ctformat.spec import GGML_TYPES
from gguf_models import write_model
from gguf_peers import need

gguf = need("gguf")
need("sentencepiece")




def test_ggml_type_table_is_gguf_py_s():
    """spec.GGML_TYPES against gguf-py 0.19 (Q8_1: ggml.c's 36 bytes, gguf-py says 40; Q2_0 is
    llama.cpp's, newer than gguf-py 0.19)."""
    theirs = {int(t): (t.name, *gguf.GGML_QUANT_SIZES[t]) for t in gguf.GGMLQuantizationType}
    assert {k: v for k, v in GGML_TYPES.items() if k not in (9, 42)} == {k: v for k, v in theirs.items() if k != 9}
    assert theirs[9][:2] == GGML_TYPES[9][:2]


def test_convert_inspect_validate(tmp_path, capsys):
    ct = write_model("mixtral", tmp_path / "mixtral", quantized=True)
    out = tmp_path / "out" / "m.gguf"
    out.parent.mkdir()
    code, text, err = cli("convert", str(ct), str(out), "--to", "gguf", "--split-max-size", "20kB")
    assert code == 0, err
    # 8 attention modules and 24 experts (a stack is written expert by expert)
    assert text.startswith(f"wrote {out}: 32 modules repacked, 9 tensors copied") and "file(s)" in text
    shards = sorted(out.parent.iterdir())
    assert len(shards) > 2 and all(p.name.startswith("m-0000") for p in shards)
    code, text, _ = cli("inspect", str(shards[-1]), "--json")
    doc = json.loads(text)
    assert code == 0 and doc["schema"] == "ctformat.inspect-gguf/1" and doc["architecture"] == "llama"
    assert doc["ggml_types"]["Q4_0"]["tensors"] == 14 and doc["bits_per_quantized_weight"] == 4.5
    assert len(doc["files"]) == len(shards) and doc["tensors"] == 23 and doc["metadata"]["llama.expert_count"] == 4
    code, text, _ = cli("validate", str(out.parent), "--json")
    doc = json.loads(text)
    assert code == 0 and doc["ok"] and doc["format"] == "gguf" and doc["tensors_checked"] == 23
    code, text, _ = cli("inspect", str(shards[0]))
    assert code == 0 and "GGUF version 3" in text and "Q4_0" in text


def test_header_reader_agrees_with_gguf_py(tmp_path):
    ct = write_model("qwen3_moe", tmp_path / "q", quantized=True)
    from ctformat.convert import convert_to_gguf
    convert_to_gguf(ct, tmp_path / "q.gguf", device="cpu")
    for path in (tmp_path / "q.gguf", BAD / "GGUF-06" / "model-00001-of-00002.gguf"):
        from ctformat.gguf_header import read_gguf_header
        ours, theirs = read_gguf_header(path), gguf.GGUFReader(path)
        assert ours.problems == []
        want = {k: f.contents() for k, f in theirs.fields.items() if not k.startswith("GGUF.")}
        assert ours.fields == want
        assert [(t.name, t.ggml_type, t.shape[::-1], t.offset, t.nbytes) for t in ours.tensors] == [
            (t.name, t.tensor_type.name, tuple(int(v) for v in t.shape), int(t.data_offset), int(t.n_bytes))
            for t in theirs.tensors]


def test_refusal_leaves_nothing_and_allow_lossy_reports(tmp_path, capsys):
    from ctformat.checkpoint import open_checkpoint
    from ctformat.writer import save_checkpoint
    ct = write_model("llama", tmp_path / "llama", quantized=True)
    ckpt = open_checkpoint(ct)
    t = {n: ckpt.load(n) for n in ckpt.tensors}
    t["model.layers.1.self_attn.o_proj.weight_scale"][2, 1] = 2.0 ** -20 * 1.5078125   # no fp16 holds it
    save_checkpoint(tmp_path / "bad", t, ckpt.config)
    shutil.copy(ct / "tokenizer.model", tmp_path / "bad" / "tokenizer.model")
    out = tmp_path / "out"
    out.mkdir()
    code, _, err = cli("convert", str(tmp_path / "bad"), str(out / "m.gguf"), "--to", "gguf")
    assert code == 1 and list(out.iterdir()) == []
    assert err.startswith("Error: model.layers.1.self_attn.o_proj: 1 of 128 scales change in fp16, the first at [2, 1]")
    assert err.rstrip().endswith("(pass --allow-lossy to write fp16(s) and report the error) [GCV-04]")
    code, text, err = cli("convert", str(tmp_path / "bad"), str(out / "m.gguf"), "--to", "gguf", "--allow-lossy")
    assert code == 0 and "--allow-lossy: 1 scale(s) rounded to fp16, largest relative error 0.00518" in text


def test_options_belong_to_their_target(tmp_path, capsys):
    ct = write_model("llama", tmp_path / "llama", quantized=True)
    code, _, err = cli("convert", str(ct), str(tmp_path / "m.gguf"), "--to", "gguf", "--max-shard-size", "1GB")
    assert code == 2 and "--to gguf takes --split-max-size" in err
    code, _, err = cli("convert", str(ct), str(tmp_path / "d"), "--to", "dense", "--outtype", "f16")
    assert code == 2 and "--outtype goes with --to gguf" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama"]


def test_plan_drops_only_what_llama_cpp_drops(tmp_path):
    """A tied lm_head and rotary inv_freq buffers are left out and reported; check_plan accepts
    them only as named drops."""
    from ctformat.checkpoint import open_checkpoint
    from ctformat.convert import convert_to_gguf
    from ctformat.pipeline import check_plan
    from ctformat.spec import QUANT_PARAMS
    from ctformat.to_gguf import gguf_plan
    from ctformat.writer import save_checkpoint
    ct = write_model("llama", tmp_path / "llama", quantized=True)
    ckpt = open_checkpoint(ct)
    t = {n: ckpt.load(n) for n in ckpt.tensors}
    t["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    t["lm_head.weight"] = t["model.embed_tokens.weight"].clone()
    save_checkpoint(tmp_path / "tied", t, dict(ckpt.config, tie_word_embeddings=True))
    shutil.copy(ct / "tokenizer.model", tmp_path / "tied" / "tokenizer.model")
    result = convert_to_gguf(tmp_path / "tied", tmp_path / "m.gguf", device="cpu")
    assert set(result.details["dropped"]) == {"lm_head.weight", "model.layers.0.self_attn.rotary_emb.inv_freq"}
    r = {x.name for x in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    assert "output.weight" not in r and "token_embd.weight" in r
    tied = open_checkpoint(tmp_path / "tied")
    plan = gguf_plan(tied)
    with pytest.raises(RuntimeError, match="loses"):
        check_plan(tied, plan.steps, frozenset(QUANT_PARAMS))          # the same plan without its drops named
    with pytest.raises(RuntimeError, match="drops what it reads"):
        check_plan(tied, plan.steps, frozenset(QUANT_PARAMS), frozenset(plan.dropped) | {"model.norm.weight"})


def test_every_bad_gguf_fixture_is_refused_by_inspect(capsys):
    for rule in ("GGUF-01", "GGUF-02", "GGUF-03", "GGUF-04", "GGUF-05", "GGUF-06"):
        code, _, err = cli("inspect", str(BAD / rule))
        assert code == 1 and err.rstrip().endswith(f"[{rule}]"), err
        with pytest.raises(Exception) as exc:
            open_gguf_model(BAD / rule)
        assert exc.value.rule == rule
