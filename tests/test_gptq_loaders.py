"""Real loaders on ctformat's GPTQ/AWQ output (spec/gptq-awq.md §8): GPTQModel and transformers.

Runs only where gptqmodel is importable (its own venv: tests/run_gptq_loaders.sh). Each check
loads a converted tiny model on the CPU in float16 and asserts that every quantized module's
effective weight is fp16(s * (u - z)) bit for bit, and that logits are close to a dense fp16
model of the same weights.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

gptqmodel = pytest.importorskip("gptqmodel")
transformers = pytest.importorskip("transformers")

from ctformat.checkpoint import open_checkpoint, save_checkpoint  # noqa: E402
from ctformat.gptq_convert import convert_to_gptq  # noqa: E402
from ctformat.pack import unpack_from_int32  # noqa: E402
from ctformat.quant import compress  # noqa: E402
from ctformat.scheme import QuantScheme  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
REAL = Path(os.environ.get("CTFORMAT_REAL_CHECKPOINTS", ROOT.parent / "shared" / "real-checkpoints"))
LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
         "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "head_dim": 16, "vocab_size": 256, "max_position_embeddings": 128, "rms_norm_eps": 1e-5,
         "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "bfloat16",
         "bos_token_id": 1, "eos_token_id": 2}
LINEARS = {"self_attn.q_proj": (64, 64), "self_attn.k_proj": (32, 64), "self_attn.v_proj": (32, 64),
           "self_attn.o_proj": (64, 64), "mlp.gate_proj": (128, 64), "mlp.up_proj": (128, 64),
           "mlp.down_proj": (64, 128)}
IDS = torch.tensor([[1, 17, 42, 99, 3, 250, 7, 64, 128, 5, 200, 31]])


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


def dense_reference(src: Path, weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A dense fp16 transformers model of the same weights (the expected quantized ones)."""
    ckpt = open_checkpoint(src)
    cfg = transformers.AutoConfig.for_model(**{k: v for k, v in ckpt.config.items() if k != "quantization_config"})
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float16).eval()
    state = {f"{p}.weight": w for p, w in weights.items()}
    for p, m in ckpt.modules().items():
        if not m.quantized:
            state.update({i.name: ckpt.load(i.name).to(torch.float16) for i in m.tensors.values()})
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    return model


def effective_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Each quantized layer applied to the identity: exactly its weight, transposed."""
    out = {}
    for name, mod in model.named_modules():
        if hasattr(mod, "qweight") and hasattr(mod, "in_features"):
            eye = torch.eye(mod.in_features, dtype=torch.float16)
            with torch.no_grad():
                out[name] = mod(eye).T.contiguous()
    return out


def _check(model: torch.nn.Module, src: Path, report: dict) -> None:
    want = expected_weights(src)
    got = effective_weights(model)
    assert set(got) == set(want), sorted(set(got) ^ set(want))[:4]
    for p in want:
        assert got[p].dtype == torch.float16 and torch.equal(got[p], want[p]), p
    with torch.no_grad():
        logits = model(IDS).logits.float()
        ref = dense_reference(src, want)(IDS).logits.float()
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
        for target, fmt in (("gptq", "gptq"), ("gptq", "gptq_v2"), ("awq", None)):
            if fmt == "gptq" and not sym:
                continue                  # GPTQModel refuses asymmetric v1 it did not write (spec §4.1)
            dst = root / f"{target}-{fmt}-{'sym' if sym else 'asym'}"
            convert_to_gptq(src, dst, target, fmt=fmt)
            out[f"{target}-{fmt}-{sym}"] = dst
    return out


CASES = [("gptq", "gptq", True), ("gptq", "gptq_v2", True), ("gptq", "gptq_v2", False), ("awq", None, True),
         ("awq", None, False)]


@pytest.mark.parametrize("target,fmt,sym", CASES)
def test_gptqmodel_loads_bit_exact(models, target, fmt, sym):
    from gptqmodel import BACKEND, GPTQModel
    backend = BACKEND.GPTQ_TORCH if target == "gptq" else BACKEND.AWQ_TORCH
    model = GPTQModel.load(str(models[f"{target}-{fmt}-{sym}"]), device="cpu", backend=backend, dtype=torch.float16)
    report = {"loader": f"gptqmodel {gptqmodel.__version__}", "torch": torch.__version__}
    _check(model.model, models[f"ct-{sym}"], report)
    _record(f"gptqmodel {target} {fmt} sym={sym}", report)


@pytest.mark.parametrize("target,fmt,sym", CASES)
def test_transformers_loads_bit_exact(models, target, fmt, sym):
    model = transformers.AutoModelForCausalLM.from_pretrained(str(models[f"{target}-{fmt}-{sym}"]),
                                                              dtype=torch.float16, device_map="cpu").eval()
    report = {"loader": f"transformers {transformers.__version__}", "torch": torch.__version__}
    _check(model, models[f"ct-{sym}"], report)
    _record(f"transformers {target} {fmt} sym={sym}", report)
