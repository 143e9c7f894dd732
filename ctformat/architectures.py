"""Which modules `targets: ["Linear"]` matched, per MoE family and producer era (spec/targets.md).

compressed-tensors matches a class target against the classes of the module in the model the
producer built (CT `utils/match.py` `_match_class`): an nn.Linear, or a subclass, matches
"Linear"; an MoE router with a class of its own does not. The checkpoint does not say which
code built the model, and the router classes changed between eras, so the verdict for a router
is "linear" (nn.Linear in every era), "never" (in none) or "depends". Torch-free: facts only,
measured on the meta device with transformers 4.57.1 and 5.25.0 and read from the remote code.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal, Mapping

__all__ = ["ERAS", "Router", "ROUTERS", "EXPERT_COUNT_KEYS", "RouterVerdict", "router_verdict", "model_type_of"]

TF4, TF5, REMOTE = "transformers 4.x", "transformers 5.x", "remote code"
ERAS = (TF4, TF5, REMOTE)


@dataclass(frozen=True, slots=True)
class Router:
    """An MoE router (or gate) module: where it sits in a decoder layer, its class per era."""

    path: str                                  # inside `layers.N.`, as the checkpoint names it
    classes: tuple[tuple[str, str], ...]       # (era, class name) for each era that builds it
    linear: frozenset[str]                     # the eras whose class is nn.Linear or a subclass

    def verdict(self) -> Literal["linear", "never", "depends"]:
        eras = {era for era, _ in self.classes}
        return "never" if not self.linear else "linear" if self.linear == eras else "depends"


def _router(path: str, linear: tuple[str, ...] = (), **classes: str) -> Router:
    era_of = {"tf4": TF4, "tf5": TF5, "remote": REMOTE}
    return Router(path, tuple((era_of[k], v) for k, v in classes.items()), frozenset(era_of[k] for k in linear))


# model_type -> its routers. Routed experts are per-expert nn.Linear in transformers 4.x for
# DeepSeek, Qwen and Mixtral, but fused 3-D parameters (*Experts classes, not Linear) in 5.x and,
# for gpt-oss and Llama 4, in both; llm-compressor unfuses them into per-expert nn.Linear before
# quantizing, which is why checkpoints name them experts.N.<proj>.
ROUTERS: dict[str, tuple[Router, ...]] = {
    "deepseek_v2": (_router("mlp.gate", tf4="DeepseekV2MoEGate", tf5="DeepseekV2TopkRouter", remote="MoEGate"),),
    "deepseek_v3": (_router("mlp.gate", tf4="DeepseekV3TopkRouter", tf5="DeepseekV3TopkRouter", remote="MoEGate"),),
    "kimi_k2": (_router("mlp.gate", remote="MoEGate"),),          # modeling_deepseek.py, DeepSeek-V3's code
    "glm4_moe": (_router("mlp.gate", tf4="Glm4MoeTopkRouter", tf5="Glm4MoeTopkRouter"),),
    "gpt_oss": (_router("mlp.router", tf4="GptOssTopKRouter", tf5="GptOssTopKRouter"),),
    "qwen2_moe": (_router("mlp.gate", ("tf4",), tf4="Linear", tf5="Qwen2MoeTopKRouter"),
                  _router("mlp.shared_expert_gate", ("tf4", "tf5"), tf4="Linear", tf5="Linear")),
    "qwen3_moe": (_router("mlp.gate", ("tf4",), tf4="Linear", tf5="Qwen3MoeTopKRouter"),),
    "llama4_text": (_router("feed_forward.router", ("tf4", "tf5"), tf4="Llama4Router", tf5="Llama4Router"),),
    "mixtral": (_router("block_sparse_moe.gate", ("tf4",), tf4="Linear", tf5="MixtralTopKRouter"),),
}
ROUTERS["llama4"] = ROUTERS["llama4_text"]                        # the text model inside Llama 4

# config keys that hold the number of routed experts, across families
EXPERT_COUNT_KEYS = ("n_routed_experts", "num_experts", "num_local_experts", "moe_num_experts")
_GENERIC_LEAVES = frozenset({"gate", "router"})                   # a router's name in families not listed
_IN_LAYER = re.compile(r"(?:^|\.)layers\.\d+\.(.+)$")


@dataclass(frozen=True, slots=True)
class RouterVerdict:
    """Whether a class target "Linear" matched this router in the producer's model, and why."""

    linear: Literal["linear", "never", "depends"]
    why: str


def model_type_of(config: Mapping[str, Any] | None) -> str | None:
    """config.json's model_type; for a multimodal config whose own type is not listed, its text model's."""
    config = config or {}
    own = config.get("model_type")
    text = config.get("text_config")
    inner = text.get("model_type") if isinstance(text, Mapping) else None
    if isinstance(own, str) and (own in ROUTERS or not isinstance(inner, str)):
        return own
    return inner if isinstance(inner, str) else None


def _expert_count(config: Mapping[str, Any]) -> int | None:
    for scope in (config, config.get("text_config")):
        if isinstance(scope, Mapping):
            for key in EXPERT_COUNT_KEYS:
                if isinstance(scope.get(key), int) and not isinstance(scope.get(key), bool):
                    return scope[key]
    return None


def router_verdict(config: Mapping[str, Any] | None, prefix: str, rows: int | None) -> RouterVerdict | None:
    """The verdict for module `prefix` (whose weight has `rows` output rows) if it is an MoE
    router, else None (an ordinary module).

    A listed family is judged by the table; any other model is judged by name and shape: a
    `gate` or `router` in a decoder layer with one row per routed expert is a router of
    unknown class, so "depends".
    """
    hit = _IN_LAYER.search(prefix)
    if hit is None:
        return None
    path, model_type = hit.group(1), model_type_of(config)
    for r in ROUTERS.get(model_type or "", ()):
        if path == r.path:
            names = ", ".join(f"{era}: {cls}" for era, cls in r.classes)
            return RouterVerdict(r.verdict(), f"{model_type} builds {path} as {names}")
    if model_type in ROUTERS:
        return None
    experts = _expert_count(config or {})
    if path.rpartition(".")[2] in _GENERIC_LEAVES and experts is not None and rows == experts:
        return RouterVerdict("depends", f"{path} has one row per routed expert ({experts}): an MoE router, whose "
                             f"class in {model_type or 'this model'}'s code ctformat does not know")
    return None
