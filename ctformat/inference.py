"""Reference inference (spec §11): a transformers model built from a checkpoint's config.json,
its weights filled from ctformat's dequantization, decoder layers streamed onto the device
one at a time; `run` gives next-token probabilities, `compare` the KL divergence between
two checkpoints' predictions and their per-module weight error.

transformers owns the architecture and its forward code; its own checkpoint conversion
(renamings, fused experts) maps checkpoint names to its parameters, so nothing here is
written per architecture except ctformat's Mixtral expert renaming (spec §7.2).
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .checkpoint import Checkpoint, Module, open_checkpoint
from .dequant import decompress_loaded, dequantize_module
from .dtypes import dtype_name
from .errors import CtFormatError, UnsupportedError, UsageError
from .fold import fold, fold_bias
from .extras import require
from .linear import QuantLinear, expert_layers, expert_count
from .names import loader_name
from .pipeline import resolve_device
from .spec import KV_PARAMS
from .summary import summarize
from .to_dense import fold_matrices
from .validate import raise_for_errors

__all__ = ["ReferenceModel", "load_model", "run", "compare", "read_input_ids", "parse_input_ids", "tokenize", "kl_stats",
           "weight_errors", "checkpoint_weights", "not_simulated"]

Weights = dict[str, "QuantLinear | torch.Tensor"]     # name transformers reads -> weight as stored
Progress = Callable[[int, int], None]                  # (layers done, layers in all)
_LAYER = re.compile(r"^(.*?\.layers)\.(\d+)\.")        # decoder layer index in a tensor name
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
_SHAPE_KEYS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads", "num_key_value_heads", "num_local_experts", "num_experts_per_tok")


class ReferenceModel:
    """A transformers model created on the meta device, whose weights come from `rest` (outside
    the decoder layers, loaded once) and `layers` (one Weights per decoder layer).

    stream=True: each decoder layer is materialized on the device by a forward pre-hook
    (stored tensors copied over, dequantized, handed to transformers' loader) and freed back
    to meta by a forward hook, so the device holds one dense layer at a time.
    """

    def __init__(self, model: nn.Module, rest: Weights, layers: list[Weights], *, device: torch.device,
                 stream: bool, progress: Progress | None = None) -> None:
        self.model, self.device, self.stream, self.progress = model.eval(), device, stream, progress
        self.layers: list[Weights | None] = list(layers)
        self.stats = {"read_s": 0.0, "dequantize_s": 0.0, "assemble_s": 0.0, "compute_s": 0.0,
                      "layers_materialized": 0}
        self.blocks_path, self.blocks = _decoder_layers(model)
        if len(self.blocks) != len(layers):
            raise CtFormatError(f"the checkpoint holds weights for {len(layers)} decoder layers, the config "
                                f"says {len(self.blocks)}")
        self._load(rest, lambda k: not k.startswith(self.blocks_path + "."))
        _init_buffers(model, device)
        model.tie_weights()
        for i, block in enumerate(self.blocks):
            if stream:
                block.register_forward_pre_hook(self._pre_hook(i))
                block.register_forward_hook(self._post_hook)
            else:
                self._materialize(i)
                self.layers[i] = None              # stored form no longer needed
        self._t0 = 0.0

    @torch.inference_mode()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """float32 logits [batch, positions, vocab] for input_ids [batch, positions]."""
        self._done = 0
        t0 = _now(self.device)
        out = self.model(input_ids=input_ids.to(self.device), use_cache=False).logits.float()
        if not self.stream:        # streamed: the layer hooks time compute, between materializations
            self.stats["compute_s"] += _now(self.device) - t0
        return out

    # -- weights -----------------------------------------------------------------------
    def _materialize(self, i: int) -> None:
        weights, dev = self.layers[i], self.device
        t0 = _now(dev)
        stored = {n: w.stored(dev) if isinstance(w, QuantLinear) else w.to(dev, non_blocking=True)
                  for n, w in weights.items()}
        t1 = _now(dev)
        dense = {n: weights[n].dequantize(s) if isinstance(weights[n], QuantLinear) else s
                 for n, s in stored.items()}
        del stored
        t2 = _now(dev)
        prefix = f"{self.blocks_path}.{i}."
        self._load(dense, lambda k: k.startswith(prefix))
        t3 = _now(dev)
        self.stats["read_s"] += t1 - t0
        self.stats["dequantize_s"] += t2 - t1
        self.stats["assemble_s"] += t3 - t2
        self.stats["layers_materialized"] += 1

    def _load(self, state: dict[str, torch.Tensor], in_scope: Callable[[str], bool]) -> None:
        """Hand `state` to transformers' own loader (its renamings and expert fusing), then
        insist that it read every tensor and filled every parameter in scope."""
        info = _transformers_load(self.model, state, self.device)
        tied = set(getattr(self.model, "all_tied_weights_keys", {}) or {})
        missing = sorted(k for k in info.missing_keys if in_scope(k) and k not in tied)
        unread = sorted(info.unexpected_keys) + [f"{k} (shape {list(a)}, expected {list(b)})"
                                                 for k, a, b in info.mismatched_keys]
        unread += [f"{k}: {v}" for k, v in (info.conversion_errors or {}).items()]
        if missing or unread:
            arch = type(self.model).__name__
            raise CtFormatError(f"transformers' {arch} does not read these checkpoint weights: "
                                f"{_few(unread)}; and leaves these parameters unset: {_few(missing)}")

    def _pre_hook(self, i: int):
        def hook(module: nn.Module, args: Any) -> None:
            self._materialize(i)
            self._t0 = _now(self.device)
        return hook

    def _post_hook(self, module: nn.Module, args: Any, output: Any) -> None:
        self.stats["compute_s"] += _now(self.device) - self._t0
        _free(module)
        self._done += 1
        if self.progress:
            self.progress(self._done, len(self.blocks))


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _few(names: list[str], n: int = 5) -> str:
    return "none" if not names else ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def _transformers_load(model: nn.Module, state: dict[str, torch.Tensor], device: torch.device):
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import convert_and_load_state_dict_in_model
    from transformers.modeling_utils import LoadStateDictConfig
    from transformers.utils import logging as hf_logging
    config = LoadStateDictConfig(device_map={"": str(device)}, weight_mapping=get_model_conversion_mapping(model))
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()              # one bar per layer otherwise
    try:
        info, _ = convert_and_load_state_dict_in_model(model, state, config)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return info


def _decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    n = model.config.num_hidden_layers
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and name.endswith("layers") and len(mod) == n:
            return name, mod
    raise UnsupportedError(f"{type(model).__name__}: no list of {n} decoder layers found to stream")


def _init_buffers(model: nn.Module, device: torch.device) -> None:
    """Buffers that are not weights (rotary inv_freq) are computed, as from_pretrained does:
    allocated on the device, then set by the model's own _init_weights."""
    owners = []
    for name, buf in list(model.named_buffers()):
        if buf.device.type == "meta":
            owner_name, _, leaf = name.rpartition(".")
            owner = model.get_submodule(owner_name)
            owner._buffers[leaf] = torch.empty_like(buf, device=device)
            owners.append(owner)
    with torch.no_grad():
        for owner in owners:
            model._init_weights(owner)


def _free(module: nn.Module) -> None:
    for mod in module.modules():
        for name, p in mod._parameters.items():
            if p is not None and p.device.type != "meta":
                mod._parameters[name] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)


# -- building from a checkpoint ------------------------------------------------------------
def checkpoint_weights(ckpt: Checkpoint, *, dtype: torch.dtype, device: torch.device | str = "cpu"
                       ) -> tuple[Weights, list[Weights]]:
    """Every weight of `ckpt` as stored (quantized modules as QuantLinear), named as
    transformers reads them (Mixtral experts renamed as in dense output, spec §7.2):
    (outside the decoder layers, one dict per decoder layer)."""
    model_type = ckpt.model_type
    rest: Weights = {}
    layers: dict[int, Weights] = {}
    folds = fold_matrices(ckpt)               # online rotations, folded as convert --to dense does
    for prefix, m in ckpt.modules().items():
        if m.rotation is not None:
            continue
        name = loader_name(prefix, model_type)
        dot = f"{name}." if name else ""
        items: Weights = {}
        parts = _stacked(ckpt, m, dtype, device)
        if parts is not None:         # Marlin --stack-experts: one QuantLinear per expert and part
            items.update({f"{loader_name(p, model_type)}.weight": q for p, q in parts})
        elif m.quantized and prefix in folds:
            items[f"{name}.weight"] = _folded_layer(ckpt, m, folds[prefix], dtype, device)
        elif m.quantized:
            items[f"{name}.weight"] = QuantLinear.from_checkpoint(ckpt, m, device=device, dtype=dtype)
        for suffix, info in m.tensors.items():
            if suffix in KV_PARAMS:
                continue              # kv-cache quantization is not simulated (weight-only inference)
            if not m.quantized or suffix == "bias":
                items[dot + suffix] = ckpt.load(info.name, device)
        if prefix in folds:           # a dense layer's weight, and a bias an output rotation turns
            items.update(_folded_plain(m, items, dot, folds[prefix]))
        hit = _LAYER.match(dot)
        (layers.setdefault(int(hit.group(2)), {}) if hit else rest).update(items)
    if sorted(layers) != list(range(len(layers))):
        raise CtFormatError(f"decoder layers in the checkpoint are not numbered 0..N-1: {sorted(layers)[:10]}")
    return rest, [layers[i] for i in range(len(layers))]


def _folded_layer(ckpt: Checkpoint, m: Module, mats: dict[str, torch.Tensor], dtype: torch.dtype,
                  device) -> QuantLinear:
    """A quantized module whose online rotations are folded into each dequantization."""
    tensors = {s: ckpt.load(i.name, device) for s, i in m.tensors.items() if s != "bias"}

    def dequantize(stored):
        w = decompress_loaded(ckpt, m, stored)
        return fold(w, None, mats.get("input"), mats.get("output"))[0].to(dtype)
    return QuantLinear(tensors, dequantize)


def _folded_plain(m: Module, items: Weights, dot: str, mats: dict[str, torch.Tensor]) -> Weights:
    """The folded dense weight of an unquantized module, and the folded bias of any module."""
    out: Weights = {}
    w, b = items.get(f"{dot}weight"), items.get(f"{dot}bias")
    if not m.quantized and isinstance(w, torch.Tensor):
        out[f"{dot}weight"] = fold(w, None, mats.get("input"), mats.get("output"))[0].to(w.dtype)
    if b is not None and "output" in mats:
        out[f"{dot}bias"] = fold_bias(b, mats["output"]).to(b.dtype)
    return out


def not_simulated(ckpt: Checkpoint) -> list[str]:
    """The quantization a checkpoint declares beyond its weights, which reference inference does
    not apply (it runs the dequantized weights in one dtype: weight-only, spec §11.4)."""
    q = ckpt.quant
    if q is None:
        return []
    out = sorted({f"{key.replace('_', ' ')} ({a.words()})" for g in q.groups
                  for key, a in (("input_activations", g.input_activations),
                                 ("output_activations", g.output_activations)) if a is not None})
    return out + ([f"kv cache ({q.kv_cache.words()})"] if q.kv_cache is not None else [])


def _hf_config(ckpt: Checkpoint):
    from transformers import AutoConfig
    raw = dict(ckpt.config or {})
    raw.pop("quantization_config", None)
    model_type = raw.pop("model_type", None)
    if not isinstance(model_type, str):
        raise UnsupportedError(f"{ckpt.label}: config.json names no model_type; transformers cannot build it")
    try:
        return AutoConfig.for_model(model_type, **raw)
    except (ValueError, KeyError):      # its message lists every model type it knows: not a one-liner
        import transformers
        raise UnsupportedError(f"{ckpt.label}: transformers {transformers.__version__} does not know the "
                               f"architecture {model_type!r} ({raw.get('architectures')})") from None


def _build(config, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoModelForCausalLM
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, dtype=dtype)
    except ValueError as err:
        raise UnsupportedError(f"transformers has no causal LM for {type(config).__name__}: "
                               f"{str(err).splitlines()[0][:200]}") from None


def _should_stream(ckpt: Checkpoint, dtype: torch.dtype, device: torch.device) -> bool:
    """Stream when the dense model would take more than 70 % of the free device memory."""
    if device.type != "cuda":
        return False
    dense = summarize(ckpt)["parameters"]["total"] * torch.finfo(dtype).bits // 8
    free, _ = torch.cuda.mem_get_info(device)
    return dense > 0.7 * free


def load_model(path: str | Path, *, device: str = "auto", dtype: torch.dtype = torch.bfloat16,
               stream: bool | None = None, progress: Progress | None = None) -> ReferenceModel:
    """A local checkpoint (quantized or dense) as a ReferenceModel; stream=None decides by size."""
    if not Path(path).exists():
        raise CtFormatError(f"{path}: reference inference needs a local checkpoint folder")
    require("transformers")
    dev = resolve_device(device)
    ckpt = open_checkpoint(path)
    raise_for_errors(ckpt)
    config = _hf_config(ckpt)
    stream = _should_stream(ckpt, dtype, dev) if stream is None else stream
    model = _build(config, dtype)
    rest, layers = checkpoint_weights(ckpt, dtype=dtype, device="cpu" if stream else dev)
    ref = ReferenceModel(model, rest, layers, device=dev, stream=stream, progress=progress)
    ref.config, ref.path = ckpt.config, str(path)
    ref.not_simulated = not_simulated(ckpt)
    return ref


# -- inputs --------------------------------------------------------------------------------
def read_input_ids(path: str | Path) -> torch.Tensor:
    """Token ids from a file (see parse_input_ids)."""
    return parse_input_ids(Path(path).read_text(), str(path))


def parse_input_ids(text: str, source: str = "input ids") -> torch.Tensor:
    """Token ids as people write them: a JSON list of ints (one sequence), a JSON list of equally
    long lists (a batch), or ints separated by white space or commas. Returns int64 [batch, positions];
    `source` names where the text came from in errors."""
    path = source
    try:
        data = json.loads(text)
    except ValueError:
        try:
            data = [int(v) for v in text.replace(",", " ").split()]
        except ValueError:
            raise UsageError(f"{path}: not a JSON list of token ids nor ids separated by spaces") from None
    data = [data] if isinstance(data, list) and all(isinstance(v, int) for v in data) else data
    ok = (isinstance(data, list) and data and all(isinstance(s, list) and s for s in data)
          and all(isinstance(v, int) and not isinstance(v, bool) for s in data for v in s))
    if not ok or len({len(s) for s in data}) != 1:
        raise UsageError(f"{path}: expected a non-empty list of token ids, or a list of equally long such lists")
    return torch.tensor(data, dtype=torch.int64)


def _tokenizer(path: str | Path):
    if not any((Path(path) / f).is_file() for f in _TOKENIZER_FILES):
        raise UsageError(f"{path}: no tokenizer here ({', '.join(_TOKENIZER_FILES)}); give token ids with "
                         f"--input-ids instead of --text")
    require("transformers")
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(path))


def tokenize(path: str | Path, text: str) -> torch.Tensor:
    """int64 [1, positions] from the tokenizer in the model folder."""
    ids = _tokenizer(path)(text, return_tensors="pt")["input_ids"]
    if ids.numel() == 0:
        raise UsageError("the text gives no tokens")
    return ids


def _check_ids(ids: torch.Tensor, vocab_size: int) -> None:
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab_size:
        raise UsageError(f"token ids must lie in [0, {vocab_size}) (the model's vocab_size); found "
                         f"{lo if lo < 0 else hi}")


# -- run and compare -----------------------------------------------------------------------
def run(path: str | Path, input_ids: torch.Tensor, *, top_k: int = 5, generate: int = 0, device: str = "auto",
        dtype: torch.dtype = torch.bfloat16, stream: bool | None = None, progress: Progress | None = None
        ) -> dict[str, Any]:
    """Next-token probabilities after the last position of each sequence (top_k of them),
    and `generate` greedily generated tokens (each one a full forward pass, no cache)."""
    if top_k < 1 or generate < 0:
        raise UsageError("top_k must be >= 1 and generate >= 0")
    t0 = time.perf_counter()
    ref = load_model(path, device=device, dtype=dtype, stream=stream, progress=progress)
    _check_ids(input_ids, ref.model.config.vocab_size)
    logits = ref.logits(input_ids)
    probs = torch.softmax(logits[:, -1].double(), dim=-1)
    top = torch.topk(probs, min(top_k, probs.shape[-1]), dim=-1)
    ids, generated = input_ids, []
    for step in range(generate):
        nxt = (logits if step == 0 else ref.logits(ids))[:, -1].argmax(-1, keepdim=True).cpu()
        generated.append(nxt)
        ids = torch.cat([ids, nxt], dim=1)
    tok = _tokenizer(path) if any((Path(path) / f).is_file() for f in _TOKENIZER_FILES) else None
    decode = (lambda i: tok.decode([i])) if tok is not None else (lambda i: None)
    return {
        "schema": "ctformat.run/1", "model": str(path), "device": str(ref.device), "dtype": dtype_name(dtype),
        "streamed": ref.stream, "input_ids": input_ids.tolist(), "weight_only": True,
        "not_simulated": ref.not_simulated,
        "next_token": [[{"id": int(i), "text": decode(int(i)), "prob": float(p)} for p, i in zip(ps, ix)]
                       for ps, ix in zip(top.values, top.indices)],
        "generated_ids": torch.cat(generated, dim=1).tolist() if generated else [[] for _ in input_ids],
        "generated_text": [tok.decode(g) for g in torch.cat(generated, dim=1).tolist()] if generated and tok else None,
        "timing": dict(ref.stats, seconds=round(time.perf_counter() - t0, 4)),
    }


def kl_stats(logits_a: torch.Tensor, logits_b: torch.Tensor) -> dict[str, Any]:
    """KL(A||B) in nats at every position, over the whole vocabulary, in float64; top-1 agreement."""
    la = torch.log_softmax(logits_a.double(), dim=-1).reshape(-1, logits_a.shape[-1])
    lb = torch.log_softmax(logits_b.double(), dim=-1).reshape(-1, logits_b.shape[-1])
    kl = (la.exp() * (la - lb)).sum(-1)
    q = torch.quantile(kl, torch.tensor([0.5, 0.9, 0.99], dtype=torch.float64))
    return {"positions": kl.numel(), "kl_mean": float(kl.mean()), "kl_max": float(kl.max()),
            "kl_p50": float(q[0]), "kl_p90": float(q[1]), "kl_p99": float(q[2]),
            "top1_agreement": float((la.argmax(-1) == lb.argmax(-1)).double().mean())}


def _stacked(ckpt: Checkpoint, m: Module, dtype: torch.dtype | None, device) -> list[tuple[str, QuantLinear]] | None:
    """(part module name, QuantLinear) for a stacked Marlin module (spec §10.6), else None."""
    if ckpt.marlin is None or "s" not in m.tensors:
        return None
    parts = ckpt.marlin.stacked_parts(m.prefix, m.tensors["s"].shape[-1])
    if parts is None:
        return None
    layers = expert_layers(ckpt, m, parts=len(parts) // expert_count(m), device=device, dtype=dtype)
    return [(name, layer) for (name, _), layer in zip(parts, layers)]


def weight_errors(a: str | Path, b: str | Path, *, device: str = "auto", worst: int = 10) -> dict[str, Any]:
    """‖W_A − W_B‖ / ‖W_B‖ (Frobenius, float32) for every Linear-like module of A that B also
    has (names as transformers reads them), module by module."""
    dev = resolve_device(device)
    ca, cb = open_checkpoint(a), open_checkpoint(b)
    ma, mb = _linear_modules(ca), _linear_modules(cb)
    fa, fb = fold_matrices(ca), fold_matrices(cb)
    errors = {}
    for name in sorted(ma.keys() & mb.keys()):
        wa, wb = _dense_weight(ca, ma[name], dev, fa), _dense_weight(cb, mb[name], dev, fb)
        if wa.shape != wb.shape:
            raise CtFormatError(f"{name}: weight shapes differ, {list(wa.shape)} in A and {list(wb.shape)} in B")
        den = float(torch.linalg.vector_norm(wb))
        num = float(torch.linalg.vector_norm(wa - wb))
        errors[name] = num / den if den else (0.0 if num == 0 else float("inf"))
    ranked = sorted(errors.items(), key=lambda kv: -kv[1])
    return {"modules": len(errors), "only_in_a": sorted(ma.keys() - mb.keys()), "only_in_b": sorted(mb.keys() - ma.keys()),
            "max": ranked[0][1] if ranked else None,
            "mean": sum(errors.values()) / len(errors) if errors else None,
            "worst": [{"module": n, "rel_error": e} for n, e in ranked[:worst]]}


def _linear_modules(ckpt: Checkpoint) -> dict[str, Any]:
    mt = ckpt.model_type
    out: dict[str, Any] = {}
    for p, m in ckpt.modules().items():
        parts = _stacked(ckpt, m, torch.float32, None) if m.is_linear else None
        if parts is not None:
            out.update({loader_name(name, mt): q for name, q in parts})
        elif m.is_linear:
            out[loader_name(p, mt)] = m
    return out


def _dense_weight(ckpt: Checkpoint, m, dev: torch.device, folds: dict[str, dict[str, torch.Tensor]]) -> torch.Tensor:
    """A module's dense weight in float32, its online rotations folded in (spec §11.5)."""
    if isinstance(m, QuantLinear):              # one part of a stacked Marlin module
        return m.dequantize(m.stored(dev)).float()
    w = dequantize_module(ckpt, m, device=dev) if m.quantized else ckpt.load(m.tensors["weight"].name, dev)
    mats = folds.get(m.prefix)
    if mats:
        w = fold(w, None, mats.get("input"), mats.get("output"))[0]
    return w.float()


def _same_architecture(a: Checkpoint, b: Checkpoint) -> None:
    ca, cb = a.config or {}, b.config or {}
    diff = [k for k in ("architectures", *_SHAPE_KEYS) if ca.get(k) != cb.get(k)]
    if diff:
        shown = "; ".join(f"{k}: {ca.get(k)!r} vs {cb.get(k)!r}" for k in diff[:4])
        raise UsageError(f"cannot compare {a.label} with {b.label}: different architectures ({shown})")


def compare(a: str | Path, b: str | Path, input_ids: torch.Tensor, *, device: str = "auto",
            dtype: torch.dtype = torch.bfloat16, stream: bool | None = None, worst: int = 10,
            progress: Progress | None = None) -> dict[str, Any]:
    """Run A and B on the same tokens: KL(A||B) per position, top-1 agreement, and the relative
    weight error of every Linear-like module."""
    for p in (a, b):
        if not Path(p).exists():
            raise CtFormatError(f"{p}: compare needs local checkpoint folders")
    _same_architecture(open_checkpoint(a), open_checkpoint(b))
    t0 = time.perf_counter()
    logits, skipped = [], {}
    for side, p in (("a", a), ("b", b)):
        ref = load_model(p, device=device, dtype=dtype, stream=stream, progress=progress)
        _check_ids(input_ids, ref.model.config.vocab_size)
        logits.append(ref.logits(input_ids).cpu())
        skipped[side] = ref.not_simulated
        del ref
    return {"schema": "ctformat.compare/1", "a": str(a), "b": str(b), "dtype": dtype_name(dtype),
            "device": str(resolve_device(device)), "weight_only": True, "not_simulated": skipped,
            **kl_stats(*logits),
            "weights": weight_errors(a, b, device=device, worst=worst),
            "seconds": round(time.perf_counter() - t0, 4)}
