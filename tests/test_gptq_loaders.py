"""Real loaders on ctformat's GPTQ/AWQ output (spec/gptq-awq.md §8): GPTQModel and transformers.

A check outside CI (marker outside_ci: CI deselects it and names it in its summary): GPTQModel
7.7 needs torch >= 2.14.1 and a 6 GB venv that CI cannot build in time, so
tests/run_gptq_loaders.sh runs this file in its own venv (CTFORMAT_LOADER_CHECKS=1: a missing
peer is then an error; elsewhere, without gptqmodel, the file skips). Each check loads a
converted tiny model on the CPU in float16 and asserts that every quantized module's effective
weight is fp16(s * (u - z)) bit for bit, that dense tensors are the source's, and that logits
are close to a dense fp16 model of the same weights. CTFORMAT_LOADER_LOG=FILE appends one JSON
line per check (what RESULTS.md records).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from ctformat.checkpoint import open_checkpoint
from ctformat.convert import convert
from ctformat.names import loader_name, moe_renamed
from ctformat.pack import unpack_from_int32
from ctformat.quant import compress
from ctformat.scheme import QuantScheme
from ctformat.spec import GPTQ_RENAMES
from ctformat.writer import save_checkpoint

pytestmark = pytest.mark.outside_ci


@pytest.fixture(scope="module", autouse=True)
def _gptqmodel():
    """The peer, imported only when a test runs (CI deselects these tests before that)."""
    if os.environ.get("CTFORMAT_LOADER_CHECKS"):
        import gptqmodel  # noqa: F401  (its script asked for the check: a missing peer is an error)
    else:
        pytest.importorskip("gptqmodel", reason="GPTQModel is not installed here (tests/run_gptq_loaders.sh)")

ROOT = Path(__file__).resolve().parents[1]
LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
         "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "head_dim": 16, "vocab_size": 256, "max_position_embeddings": 128, "rms_norm_eps": 1e-5,
         "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "bfloat16",
         "bos_token_id": 1, "eos_token_id": 2}
LINEARS = {"self_attn.q_proj": (64, 64), "self_attn.k_proj": (32, 64), "self_attn.v_proj": (32, 64),
           "self_attn.o_proj": (64, 64), "mlp.gate_proj": (128, 64), "mlp.up_proj": (128, 64),
           "mlp.down_proj": (64, 128)}
IDS = torch.tensor([[1, 17, 42, 99, 3, 250, 7, 64, 128, 5, 200, 31]])
MIXTRAL_IDS = IDS % 64


def write_tokenizer(folder: Path, vocab: int) -> None:
    """GPTQModel refuses a folder without tokenizer files; a word-level one of `vocab` tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "t1", "eos_token": "t2", "unk_token": "t0"}))


def tiny_llama(folder: Path, symmetric: bool) -> Path:
    gen = torch.Generator().manual_seed(7)
    scheme = QuantScheme.from_json({"num_bits": 4, "symmetric": symmetric, "strategy": "group",
                                    "group_size": 32}, where="w")
    t = {"model.embed_tokens.weight": (torch.randn(256, 64, generator=gen) * 0.02).to(torch.bfloat16),
         "model.norm.weight": torch.ones(64, dtype=torch.bfloat16),
         "lm_head.weight": (torch.randn(256, 64, generator=gen) * 0.02).to(torch.bfloat16)}
    for layer in range(LLAMA["num_hidden_layers"]):
        p = f"model.layers.{layer}"
        t[f"{p}.input_layernorm.weight"] = torch.ones(64, dtype=torch.bfloat16)
        t[f"{p}.post_attention_layernorm.weight"] = torch.ones(64, dtype=torch.bfloat16)
        for name, shape in LINEARS.items():
            w = (torch.randn(*shape, generator=gen) * 0.05).to(torch.bfloat16)
            for k, v in compress(w, scheme).items():
                t[f"{p}.{name}.{k}"] = v
    weights = {"num_bits": 4, "type": "int", "symmetric": symmetric, "strategy": "group", "group_size": 32,
               "dynamic": False}
    qc = {"quant_method": "compressed-tensors", "format": "pack-quantized", "version": "0.20.0",
          "quantization_status": "compressed", "ignore": ["lm_head"],
          "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "format": "pack-quantized"}}}
    save_checkpoint(folder, t, {**LLAMA, "quantization_config": qc})
    write_tokenizer(folder, 256)
    return folder


def expected_weights(src: Path) -> dict[str, torch.Tensor]:
    """fp16(s * (u - z)) of every quantized module of a CT checkpoint, product exact in fp32."""
    ckpt = open_checkpoint(src)
    out = {}
    for p, m in ckpt.modules().items():
        if not m.quantized:
            continue
        t = ckpt.load_module(m)
        b, shape = m.scheme.num_bits, tuple(t["weight_shape"].tolist())
        q = unpack_from_int32(t["weight_packed"], b, shape).float()
        zp = t.get("weight_zero_point")
        gs = m.scheme.group_size or shape[-1]
        g = torch.arange(shape[-1]) // gs if "weight_g_idx" not in t else t["weight_g_idx"].long()
        z = 0 if zp is None else (zp.float() if zp.dtype == torch.int8 else
                                  unpack_from_int32(zp, b, (shape[0], t["weight_scale"].shape[-1]), packed_dim=0).float())
        s = t["weight_scale"].to(torch.float16).float()
        zz = z if isinstance(z, int) else z[:, g]
        out[p] = (s[:, g] * (q - zz)).to(torch.float16)
    return out


def dense_reference(src: Path, weights: dict[str, torch.Tensor], folder: Path):
    """A dense fp16 model of the same weights (the expected quantized ones), loaded the way
    ctformat's reference inference loads dense checkpoints (transformers' own loader)."""
    from ctformat.inference import load_model
    ckpt = open_checkpoint(src)
    state = {f"{loader_name(p, ckpt.model_type)}.weight": w for p, w in weights.items()}
    for p, m in ckpt.modules().items():
        if not m.quantized:
            state.update({f"{loader_name(p, ckpt.model_type)}.{s}": ckpt.load(i.name).to(torch.float16)
                          for s, i in m.tensors.items()})
    config = {k: v for k, v in ckpt.config.items() if k != "quantization_config"}
    save_checkpoint(folder, state, {**config, "torch_dtype": "float16"})
    return load_model(folder, device="cpu", dtype=torch.float16)


def effective_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Each quantized layer applied to the identity: exactly its weight, transposed."""
    out = {}
    for name, mod in model.named_modules():
        if hasattr(mod, "qweight") and hasattr(mod, "in_features"):
            eye = torch.eye(mod.in_features, dtype=torch.float16)
            with torch.no_grad():
                out[name] = mod(eye).T.contiguous()
    return out


def _check(model: torch.nn.Module, src: Path, out: Path, ids: torch.Tensor, report: dict, tmp: Path) -> None:
    """Weights bit for bit (under the names the converted file gives them), dense tensors as
    stored, logits close to the dense reference."""
    want = expected_weights(src)
    written = open_checkpoint(out)
    by_written = {p: written.source_name(p) for p, m in written.modules().items() if m.quantized}
    got = effective_weights(model)
    assert set(got) == set(by_written), sorted(set(got) ^ set(by_written))[:4]
    for p, s in by_written.items():
        assert got[p].dtype == torch.float16 and torch.equal(got[p], want[s]), p
    params = dict(model.named_parameters()) | dict(model.named_buffers())
    dense = [(p, suffix, i) for p, m in written.modules().items() if not m.quantized for suffix, i in m.tensors.items()]
    for p, suffix, info in dense:                              # routers, norms, embeddings, lm_head
        name = f"{p}.{suffix}"
        assert name in params and torch.equal(params[name].to(torch.float16), written.load(info.name).to(torch.float16)), \
            name
    report["modules"], report["dense_tensors"] = len(got), len(dense)
    with torch.no_grad():
        logits = model(ids).logits.float()
    ref = dense_reference(src, want, tmp).logits(ids).float()
    report["max_logit_diff"] = float((logits - ref).abs().max())
    report["logit_scale"] = float(ref.abs().max())
    assert report["max_logit_diff"] < 2e-3 * max(1.0, report["logit_scale"]), report


def _record(name: str, report: dict) -> None:
    log = os.environ.get("CTFORMAT_LOADER_LOG")
    if log:
        with open(log, "a") as fh:
            fh.write(json.dumps({"check": name, **report}) + "\n")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("loaders")
    out = {}
    for sym in (True, False):
        src = tiny_llama(root / f"ct-{'sym' if sym else 'asym'}", sym)
        out[f"ct-{sym}"] = src
        for target, fmt in (("gptq", "v1"), ("gptq", "v2"), ("awq", None)):
            if fmt == "v1" and not sym:
                continue                  # GPTQModel refuses asymmetric v1 it did not write (spec §4.1)
            dst = root / f"{target}-{fmt}-{'sym' if sym else 'asym'}"
            convert(src, dst, to=target, device="cpu", **({"gptq_format": fmt} if fmt else {}))
            out[f"{target}-{fmt}-{sym}"] = dst
    mixtral = ROOT / "fixtures" / "tiny-mixtral"
    out["ct-mixtral"] = mixtral
    for target in ("gptq", "awq"):
        dst = root / f"mixtral-{target}"
        convert(mixtral, dst, to=target, device="cpu")
        write_tokenizer(dst, 64)
        out[f"mixtral-{target}"] = dst
    return out


CASES = [("gptq", "v1", True), ("gptq", "v2", True), ("gptq", "v2", False), ("awq", None, True),
         ("awq", None, False)]


def _gptqmodel_load(path: Path, target: str):
    import gptqmodel
    from gptqmodel import BACKEND, GPTQModel
    backend = BACKEND.GPTQ_TORCH if target == "gptq" else BACKEND.AWQ_TORCH
    model = GPTQModel.load(str(path), device="cpu", backend=backend, dtype=torch.float16)
    return model.model, {"loader": f"gptqmodel {gptqmodel.__version__}", "torch": torch.__version__}


@pytest.mark.parametrize("target,fmt,sym", CASES)
def test_gptqmodel_loads_bit_exact(models, target, fmt, sym, tmp_path):
    out = models[f"{target}-{fmt}-{sym}"]
    model, report = _gptqmodel_load(out, target)
    _check(model, models[f"ct-{sym}"], out, IDS, report, tmp_path / "ref")
    _record(f"gptqmodel {target} {fmt} sym={sym}", report)


@pytest.mark.parametrize("target,fmt,sym", CASES)
def test_transformers_loads_bit_exact(models, target, fmt, sym, tmp_path):
    import transformers
    out = models[f"{target}-{fmt}-{sym}"]
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float16, device_map="cpu").eval()
    report = {"loader": f"transformers {transformers.__version__}", "torch": torch.__version__}
    _check(model, models[f"ct-{sym}"], out, IDS, report, tmp_path / "ref")
    _record(f"transformers {target} {fmt} sym={sym}", report)


@pytest.mark.parametrize("target", ["gptq", "awq"])
def test_gptqmodel_loads_mixtral_with_the_names_written(models, target, tmp_path):
    """MoE: every expert (mlp.experts.E.{gate,up,down}_proj) and the router (mlp.gate) load."""
    out = models[f"mixtral-{target}"]
    model, report = _gptqmodel_load(out, target)
    _check(model, models["ct-mixtral"], out, MIXTRAL_IDS, report, tmp_path / "ref")
    assert report["modules"] == 32
    _record(f"gptqmodel mixtral {target}", report)


_TRANSFORMERS_PROBE = """
import json, sys, torch, transformers
model, info = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float16, device_map="cpu",
                                                                output_loading_info=True)
print(json.dumps({"missing": sorted(info["missing_keys"]), "unexpected": sorted(info["unexpected_keys"]),
                  "quantized": [n for n, m in model.named_modules() if hasattr(m, "qweight")],
                  "version": transformers.__version__}))
"""


@pytest.mark.parametrize("target", ["gptq", "awq"])
def test_transformers_leaves_mixtral_experts_random(models, target):
    """transformers 5.25 fuses Mixtral's experts into 3-D parameters, which optimum/gptqmodel do
    not replace with quantized layers: the expert tensors are UNEXPECTED, the fused ones MISSING
    and left at their initial values, without an error (what TRF-03 warns about). Run in a fresh
    process: once GPTQModel.load has run, it has patched transformers' Mixtral in this one."""
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-c", _TRANSFORMERS_PROBE, str(models[f"mixtral-{target}"])],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    missing = {k for k in got["missing"] if ".mlp.experts." in k}
    unexpected = {k for k in got["unexpected"] if ".mlp.experts." in k}
    assert missing == {f"model.layers.{i}.mlp.experts.{p}" for i in (0, 1) for p in ("gate_up_proj", "down_proj")}
    assert len(unexpected) == 2 * 4 * 3 * (4 if target == "gptq" else 3)     # qweight, qzeros, scales (, g_idx)
    assert got["quantized"] and not any(".experts." in n for n in got["quantized"])
    _record(f"transformers mixtral {target}", {"loader": f"transformers {got['version']}",
                                               "experts_left_random": len(missing),
                                               "quantized_modules": len(got["quantized"])})


def test_gptqmodel_misreads_mixtral_under_the_source_names(tmp_path):
    """Why convert renames (spec/gptq-awq.md §3.1): with llm-compressor's block_sparse_moe names
    (--keep-names) GPTQModel refuses the GPTQ folder, and loads the AWQ one with every expert
    left at whatever its buffers held (only the attention modules are right)."""
    src = ROOT / "fixtures" / "tiny-mixtral"
    want = expected_weights(src)
    for target in ("gptq", "awq"):
        out = tmp_path / f"keep-{target}"
        convert(src, out, to=target, device="cpu", keep_names=True)
        write_tokenizer(out, 64)
        if target == "gptq":
            with pytest.raises(ValueError, match="Missing required quantized weights"):
                _gptqmodel_load(out, target)
            _record("gptqmodel mixtral gptq keep_names", {"refused": "Missing required quantized weights"})
            continue
        model, report = _gptqmodel_load(out, target)
        got = effective_weights(model)
        right = [p for p, w in want.items() if torch.equal(got[moe_renamed(p, GPTQ_RENAMES["mixtral"])], w)]
        assert len(got) == 32 and sorted(right) == sorted(p for p in want if ".experts." not in p)
        _record("gptqmodel mixtral awq keep_names", {**report, "modules_right": len(right), "modules": len(got)})
