"""Reference inference (spec §11): ctformat's forward pass is transformers' forward pass over
ctformat's dense weights, bit for bit at float32, streamed or not; compare measures what it says."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import FIXTURES, REAL, REAL_FOLDERS, ROOT, cli
from ctformat.dequant import dequantize_module
from ctformat.checkpoint import open_checkpoint
from ctformat.writer import save_checkpoint
from ctformat.convert import convert_to_dense
from ctformat.errors import CtFormatError, UnsupportedError, UsageError
from ctformat.inference import compare, kl_stats, load_model, read_input_ids
from ctformat.linear import QuantExperts, QuantLinear
from ctformat.quant import compress
from ctformat.scheme import QuantScheme

transformers = pytest.importorskip("transformers")

E014, E041 = REAL / "llmcompressor-0.14", REAL / "llmcompressor-0.4.1"
DENSE = E014 / "dense"
# both naming eras (0.14: experts.N.gate_proj/up_proj/down_proj; 0.4.1: w1/w2/w3), with zero points and g_idx
REAL_CASES = [p for p in REAL_FOLDERS if p.name != "dense"]
IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))


def hf_logits(folder, ids):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids, use_cache=False).logits


@pytest.mark.parametrize("src", REAL_CASES + [DENSE], ids=lambda p: f"{p.parent.name}/{p.name}")
def test_logits_equal_transformers_on_ctformat_dense_output(src, tmp_path):
    convert_to_dense(src, tmp_path / "d", dtype=torch.float32, device="cpu")
    expected = hf_logits(tmp_path / "d", IDS)
    for stream in (False, True):
        got = load_model(src, device="cpu", dtype=torch.float32, stream=stream).logits(IDS)
        assert torch.equal(got, expected), stream


def test_experts_under_either_name_are_read_not_left_random(tmp_path):
    """transformers ignores experts.N.gate_proj (random values); ctformat reads both eras' names."""
    src = E014 / "w4a16-sym-g128"
    convert_to_dense(src, tmp_path / "kept", dtype=torch.float32, device="cpu", keep_names=True)
    ours = load_model(tmp_path / "kept", device="cpu", dtype=torch.float32).logits(IDS)
    assert torch.equal(ours, load_model(src, device="cpu", dtype=torch.float32).logits(IDS))
    torch.manual_seed(0)
    trap = hf_logits(tmp_path / "kept", IDS)             # what transformers itself makes of these names
    assert not torch.allclose(ours, trap, atol=1e-3)


def test_streaming_holds_one_decoder_layer_at_a_time():
    ref = load_model(E014 / "w4a16-sym-g128", device="cpu", dtype=torch.float32, stream=True)
    live = []

    def count(module, args):
        live.append(sum(any(p.device.type != "meta" for p in b.parameters()) for b in ref.blocks))
    for b in ref.blocks:
        b.register_forward_pre_hook(count)       # runs after ctformat's own pre-hook
    ref.logits(IDS)
    ref.logits(IDS)
    assert live == [1, 1, 1, 1]
    assert all(p.device.type == "meta" for b in ref.blocks for p in b.parameters())
    assert ref.stats["layers_materialized"] == 4 and ref.stats["dequantize_s"] > 0


def tiny_llama(root, *, tie: bool):
    """A random Llama saved by transformers, and the same weights pack-quantized by ctformat."""
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie,
                                   max_position_embeddings=64)
    torch.manual_seed(1)
    model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(root / "dense")
    scheme_json = {"num_bits": 4, "strategy": "group", "group_size": 32, "symmetric": False}
    scheme = QuantScheme.from_json(scheme_json, where="test")
    tensors = {}
    for name, t in model.state_dict().items():
        if ".layers." in name and name.endswith("proj.weight"):
            tensors.update({f"{name[:-len('weight')]}{k}": v for k, v in compress(t, scheme).items()})
        elif not (tie and name == "lm_head.weight"):
            tensors[name] = t
    config = json.loads((root / "dense" / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
        "ignore": ["lm_head"], "config_groups": {"group_0": {"targets": ["Linear"], "weights": dict(
            scheme_json, type="int", dynamic=False, actorder=None, observer="minmax")}}}
    save_checkpoint(root / "q", tensors, config)
    return root / "q"


@pytest.mark.parametrize("tie", [False, True])
def test_dense_llama_equals_transformers(tie, tmp_path):
    q = tiny_llama(tmp_path, tie=tie)
    convert_to_dense(q, tmp_path / "d", dtype=torch.float32, device="cpu")
    ids = IDS % 96
    got = load_model(q, device="cpu", dtype=torch.float32, stream=True).logits(ids)
    assert torch.equal(got, hf_logits(tmp_path / "d", ids))
    near = compare(q, tmp_path / "dense", ids, device="cpu", dtype=torch.float32)
    assert 0 < near["kl_mean"] < 0.05 and near["weights"]["modules"] == 14 + (not tie)


def test_compare_with_itself_is_zero_and_with_dense_is_small():
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(2))
    q = E014 / "w4a16-sym-g128"
    same = compare(q, q, ids, device="cpu", dtype=torch.float32)
    assert same["kl_max"] == 0 and same["top1_agreement"] == 1 and same["weights"]["max"] == 0
    near = compare(q, DENSE, ids, device="cpu", dtype=torch.float32)
    assert near["positions"] == 48
    assert 0 < near["kl_p50"] <= near["kl_p90"] <= near["kl_p99"] <= near["kl_max"] < 0.05
    assert 0.5 <= near["top1_agreement"] < 1
    w = near["weights"]
    assert w["modules"] == 35 and not w["only_in_a"] and not w["only_in_b"]   # 32 quantized, 2 routers, lm_head
    assert 0.05 < w["max"] < 0.2 and w["worst"][0]["rel_error"] == w["max"]
    # routers and lm_head are stored dense in both: exactly equal
    assert {r["module"] for r in w["worst"]}.isdisjoint({"lm_head", "model.layers.0.block_sparse_moe.gate"})


def test_cli_compare_json_is_the_report_of_the_api(tmp_path, capsys):
    ids = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(9))
    (tmp_path / "ids.json").write_text(json.dumps(ids.tolist()))
    q = E014 / "w4a16-gptq-g128"          # GPTQ of DENSE
    code, out, err = cli("compare", str(q), str(DENSE), "--input-ids", str(tmp_path / "ids.json"),
                         "--dtype", "float32", "--device", "cpu", "--worst", "2", "--json")
    doc = json.loads(out)
    want = compare(q, DENSE, ids, device="cpu", dtype=torch.float32, worst=2)
    assert code == 0 and doc["schema"] == "ctformat.compare/1" and doc["a"] == str(q) and doc["b"] == str(DENSE)
    for key in ("positions", "kl_mean", "kl_max", "kl_p50", "kl_p90", "kl_p99", "top1_agreement"):
        assert doc[key] == want[key], key
    assert doc["weights"] == want["weights"] and len(doc["weights"]["worst"]) == 2
    assert 0 < doc["kl_max"] < 0.05 and "Traceback" not in err


def test_kl_stats_match_a_direct_computation():
    a, b = torch.randn(3, 5, 40), torch.randn(3, 5, 40)
    s = kl_stats(a, b)
    pa, pb = a.double().softmax(-1), b.double().softmax(-1)
    kl = (pa * (pa.log() - pb.log())).sum(-1).flatten()
    assert s["positions"] == 15 and s["kl_max"] == pytest.approx(float(kl.max()), rel=1e-9)
    assert s["kl_mean"] == pytest.approx(float(kl.mean()), rel=1e-9)
    assert s["top1_agreement"] == float((a.argmax(-1) == b.argmax(-1)).double().mean())


# -- the quantized modules --------------------------------------------------------------------
@pytest.mark.parametrize("folder", ["tiny-mixtral", "int4-g32-asym", "int4-g32-actorder", "int3-g32-padded"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quant_linear_forward_is_x_times_dequantized_weight(folder, dtype):
    ckpt = open_checkpoint(FIXTURES / folder)
    m = next(m for p, m in ckpt.modules().items() if m.quantized and "q_proj" in p)
    layer = QuantLinear.from_checkpoint(ckpt, m, dtype=dtype)
    w = layer.dequantize()
    assert torch.equal(w, dequantize_module(ckpt, m, dtype=dtype))
    x = torch.randn(2, 7, w.shape[1], generator=torch.Generator().manual_seed(3)).to(dtype)
    assert torch.equal(layer(x), x @ w.T)
    assert torch.equal(layer(x), torch.nn.functional.linear(x, w))     # what nn.Linear computes


def test_quant_linear_from_tensors_and_expert_stack():
    scheme = QuantScheme.from_json({"num_bits": 4, "strategy": "group", "group_size": 32, "symmetric": True},
                                   where="test")
    g = torch.Generator().manual_seed(4)
    ws = [torch.randn(48, 64, generator=g).to(torch.bfloat16) for _ in range(3)]
    experts = QuantExperts([QuantLinear.from_tensors(compress(w, scheme), scheme) for w in ws])
    stack = experts.dequantize()
    assert stack.shape == (3, 48, 64) and not torch.equal(stack[0], stack[1])
    for e, layer in enumerate(experts.experts):
        assert torch.equal(stack[e], layer.dequantize())
    dense = torch.stack(ws).float()
    assert torch.linalg.vector_norm(stack.float() - dense) / torch.linalg.vector_norm(dense) < 0.15   # int4
    x = torch.randn(3, 5, 64, generator=g).to(torch.bfloat16)
    assert torch.equal(experts(x), x @ stack.mT)


def test_quant_layers_read_marlin_checkpoints(tmp_path):
    """Per-module Marlin: QuantLinear rebuilds the source's weight and computes x @ W.T. Stacked
    Marlin (w13, w2): QuantLinear refuses the stack; QuantExperts splits it into its experts,
    each w13 being gate then up."""
    from ctformat.convert import convert_to_marlin
    src = FIXTURES / "tiny-mixtral-g64"
    convert_to_marlin(src, tmp_path / "m", device="cpu")
    convert_to_marlin(src, tmp_path / "s", device="cpu", stack_experts=True)
    ct, mod, stk = open_checkpoint(src), open_checkpoint(tmp_path / "m"), open_checkpoint(tmp_path / "s")
    p = "model.layers.0.block_sparse_moe.experts"
    for name in ("model.layers.0.self_attn.q_proj", f"{p}.1.w1"):
        layer = QuantLinear.from_checkpoint(mod, mod.modules()[name], dtype=torch.float32)
        w = dequantize_module(ct, ct.modules()[name], dtype=torch.float32)
        assert torch.equal(layer.dequantize(), w)
        x = torch.randn(3, w.shape[1], generator=torch.Generator().manual_seed(5))
        assert torch.equal(layer(x), x @ w.T)
    with pytest.raises(UsageError, match="a stack of 4 experts; QuantExperts"):
        QuantLinear.from_checkpoint(stk, stk.modules()[f"{p}.w13"])
    for part, names in (("w13", ("w1", "w3")), ("w2", ("w2",))):
        experts = QuantExperts.from_checkpoint(stk, [stk.modules()[f"{p}.{part}"]], dtype=torch.float32)
        want = torch.stack([torch.cat([dequantize_module(ct, ct.modules()[f"{p}.{e}.{n}"], dtype=torch.float32)
                                       for n in names]) for e in range(4)])
        assert len(experts.experts) == 4 and torch.equal(experts.dequantize(), want)
        x = torch.randn(4, 5, want.shape[-1], generator=torch.Generator().manual_seed(6))
        assert torch.equal(experts(x), x @ want.mT)


def test_quant_experts_split_a_stacked_compressed_tensors_module(tmp_path):
    """A 3-D compressed-tensors module (asymmetric: packed zero points carry the expert dim too)
    is split into experts equal to the stack's own dequantization."""
    s = QuantScheme.from_json({"num_bits": 4, "strategy": "group", "group_size": 32, "symmetric": False},
                              where="test")
    w = (torch.randn(3, 40, 64, generator=torch.Generator().manual_seed(7)) * 0.02).to(torch.bfloat16)
    t = {f"model.layers.0.mlp.experts.{k}": v for k, v in compress(w, s).items()}
    config = json.loads((FIXTURES / "int4-g32-asym" / "config.json").read_text())
    ckpt = open_checkpoint(save_checkpoint(tmp_path / "m", t, config))
    m = ckpt.modules()["model.layers.0.mlp.experts"]
    with pytest.raises(UsageError, match="a stack of 3 experts"):
        QuantLinear.from_checkpoint(ckpt, m)
    experts = QuantExperts.from_checkpoint(ckpt, [m])
    stack = dequantize_module(ckpt, m)
    assert len(experts.experts) == 3 and stack.shape == (3, 40, 64) and torch.equal(experts.dequantize(), stack)


def test_quant_linear_refuses_a_dense_module():
    ckpt = open_checkpoint(FIXTURES / "tiny-mixtral")
    with pytest.raises(UsageError, match="stored dense"):
        QuantLinear.from_checkpoint(ckpt, ckpt.modules()["lm_head"])


# -- inputs and bad input ---------------------------------------------------------------------
def test_read_input_ids_forms(tmp_path):
    for text, want in (("[1, 2, 3]", [[1, 2, 3]]), ("[[1, 2], [3, 4]]", [[1, 2], [3, 4]]), ("5 6\n7", [[5, 6, 7]])):
        (tmp_path / "ids").write_text(text)
        assert read_input_ids(tmp_path / "ids").tolist() == want
    for bad in ("[[1, 2], [3]]", "[]", "hello", '{"a": 1}', "[1.5]"):
        (tmp_path / "ids").write_text(bad)
        with pytest.raises(UsageError):
            read_input_ids(tmp_path / "ids")


def test_unknown_architecture_is_a_clear_error(tmp_path, capsys):
    import shutil
    shutil.copytree(FIXTURES / "tiny-mixtral-ct019", tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg.update(model_type="frobnicator", architectures=["FrobnicatorForCausalLM"])
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedError, match="does not know the architecture 'frobnicator'"):
        load_model(tmp_path / "m", device="cpu")
    (tmp_path / "ids.json").write_text("[1, 2, 3]")
    code, out, err = cli("run", str(tmp_path / "m"), "--input-ids", str(tmp_path / "ids.json"))
    assert code == 1 and out == "" and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and "does not know the architecture 'frobnicator'" in err
    assert len(err) < 300, err


def test_weights_transformers_would_not_read_are_an_error(tmp_path):
    q = tiny_llama(tmp_path, tie=False)
    ckpt = open_checkpoint(q)
    tensors = {n: ckpt.load(n) for n in ckpt.tensors}
    tensors["model.layers.1.mlp.extra.weight"] = torch.zeros(4, dtype=torch.bfloat16)   # 1-D: no Linear
    save_checkpoint(tmp_path / "extra", tensors, ckpt.config)
    with pytest.raises(CtFormatError, match=r"does not read these checkpoint weights: model\.layers\.1\.mlp\.extra"):
        load_model(tmp_path / "extra", device="cpu", stream=True).logits(IDS % 96)




def test_cli_run_and_compare(capsys, tmp_path):
    src = str(E041 / "w4a16-gptq-g128")
    (tmp_path / "ids.json").write_text(json.dumps(IDS.tolist()))
    from ctformat_cli.main import main
    main(["run", src, "--text", "Hello world", "--json", "--top-k", "3", "--generate", "2", "--device", "cpu"])
    doc = json.loads(capsys.readouterr().out)
    assert doc["schema"] == "ctformat.run/1" and len(doc["next_token"][0]) == 3
    assert doc["next_token"][0][0]["prob"] >= doc["next_token"][0][1]["prob"] > 0
    assert len(doc["generated_ids"][0]) == 2 and doc["generated_ids"][0][0] == doc["next_token"][0][0]["id"]
    main(["compare", src, src, "--input-ids", str(tmp_path / "ids.json"), "--device", "cpu"])
    out = capsys.readouterr().out
    assert "top-1 agreement 1.0000" in out and "mean 0.000e+00" in out


def test_cli_bad_input_exit_codes(capsys, tmp_path):
    (tmp_path / "ids.json").write_text("[1, 256]")
    code, out, err = cli("run", str(DENSE), "--text", "hi", "--device", "cpu")
    assert code == 2 and "no tokenizer" in err and "--input-ids" in err and out == ""
    code, _, err = cli("run", str(DENSE), "--input-ids", str(tmp_path / "ids.json"), "--device", "cpu")
    assert code == 2 and "token ids must lie in [0, 256)" in err and "found 256" in err
    code, _, err = cli("compare", str(DENSE), str(FIXTURES / "tiny-mixtral"), "--input-ids",
                       str(tmp_path / "ids.json"))
    assert code == 2 and "different architectures" in err and "hidden_size: 384 vs 64" in err
    code, _, err = cli("run", str(DENSE))
    assert code == 2 and "exactly one of --text and --input-ids" in err
    code, _, err = cli("run", str(tmp_path / "nothing"), "--input-ids", str(tmp_path / "ids.json"))
    assert code == 1 and "needs a local checkpoint" in err and "Traceback" not in err


@pytest.mark.parametrize("stack", [False, True], ids=["per-module", "stacked"])
def test_marlin_checkpoint_gives_the_same_logits(tmp_path, stack):
    """A Marlin checkpoint (per-expert, or experts stacked as w13/w2) gives its source's logits,
    and compare finds zero weight error."""
    from ctformat.convert import convert_to_marlin
    src = E014 / "w4a16-sym-g128"
    convert_to_marlin(src, tmp_path / "m", device="cpu", stack_experts=stack)
    expected = load_model(src, device="cpu", dtype=torch.float32).logits(IDS)
    assert torch.equal(load_model(tmp_path / "m", device="cpu", dtype=torch.float32, stream=True).logits(IDS), expected)
    report = compare(tmp_path / "m", src, IDS, device="cpu", dtype=torch.float32)
    assert report["weights"]["modules"] == 35 and report["weights"]["max"] == 0.0


def test_input_ids_inline_file_and_stdin_give_the_same_tokens(capsys, tmp_path, monkeypatch):
    src = str(E041 / "w4a16-gptq-g128")
    (tmp_path / "ids.txt").write_text("1 17 42\n")
    docs = []
    for ids in ("1 17 42", "[1, 17, 42]", "1,17,42", str(tmp_path / "ids.txt"), "-"):
        monkeypatch.setattr("sys.stdin", __import__("io").StringIO("1 17 42"))
        code, out, err = cli("run", src, "--input-ids", ids, "--json", "--device", "cpu")
        assert code == 0, err
        docs.append(json.loads(out))
    assert all(d["input_ids"] == [[1, 17, 42]] for d in docs)
    assert len({json.dumps(d["next_token"]) for d in docs}) == 1
    code, out, err = cli("run", src, "--input-ids", "ids.json", "--device", "cpu")
    assert code == 2 and "no such file either" in err and out == ""


def test_run_times_the_forward_pass_without_streaming(capsys):
    code, out, _ = cli("run", str(E041 / "w4a16-gptq-g128"), "--input-ids", "1 2 3", "--json",
                       "--device", "cpu", "--no-stream")
    timing = json.loads(out)["timing"]
    assert code == 0 and 0 < timing["compute_s"] <= timing["seconds"]


def test_missing_transformers_is_one_line_naming_the_extra():
    """The README's first command installs no transformers: run must say what to install."""
    code = ("import sys; sys.modules['transformers'] = None\n"      # as if it were not installed
            "from ctformat_cli.main import main\nmain(sys.argv[1:])")
    r = subprocess.run([sys.executable, "-c", code, "run", str(E041 / "w4a16-gptq-g128"), "--input-ids", "1 2 3"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 1 and "pip install 'ctformat[inference]'" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
