"""What the planner needs to know about a model, read from its config.json alone (no torch, no transformers).

Counts every parameter by group (attention, routed experts, shared experts, dense MLP, embeddings, lm_head,
norms / router / biases) for the architectures moefit plans: dense Llama, Mixtral, Qwen3-MoE, gpt-oss, Llama 4
(MoE on every layer, as Scout, or interleaved with dense layers, as Maverick), GLM-4.5 and DeepSeek-V3 (dense first
layers, shared expert; DeepSeek's multi-head latent attention). The few defaults that
transformers' config classes fill in at load time are replicated here (see `_llama4_moe_layers` and friends).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError

PRESETS_DIR = Path(__file__).resolve().parent.parent / "models" / "presets"
PRESETS = tuple(sorted(p.stem for p in PRESETS_DIR.glob("*.json")))  # presets/SOURCES.md says where each came from
# Hub ids whose config.json ships as a preset (presets/SOURCES.md), so they plan without network.
HUB_ALIASES = {
    "meta-llama/llama-4-scout-17b-16e-instruct": "llama4-scout",
    "meta-llama/llama-4-scout-17b-16e": "llama4-scout",
    "meta-llama/llama-4-maverick-17b-128e-instruct": "llama4-maverick",
    "meta-llama/llama-4-maverick-17b-128e": "llama4-maverick",
    "mistralai/mixtral-8x7b-instruct-v0.1": "mixtral-8x7b",
    "mistralai/mixtral-8x7b-v0.1": "mixtral-8x7b",
    "qwen/qwen3-30b-a3b": "qwen3-30b-a3b",
    "meta-llama/llama-3.1-8b-instruct": "llama3.1-8b",
    "meta-llama/llama-3.1-8b": "llama3.1-8b",
    "meta-llama/llama-3.1-70b-instruct": "llama3.1-70b",
    "meta-llama/llama-3.1-70b": "llama3.1-70b",
    "openai/gpt-oss-20b": "gpt-oss-20b",
    "openai/gpt-oss-120b": "gpt-oss-120b",
    "qwen/qwen3-235b-a22b": "qwen3-235b-a22b",
    "mistralai/mixtral-8x22b-v0.1": "mixtral-8x22b",
    "zai-org/glm-4.5-air": "glm-4.5-air",
    "deepseek-ai/deepseek-v3": "deepseek-v3",
}
# The families the planner counts (`moefit train` trains those in models.families).
FAMILIES = ("llama", "mixtral", "qwen3_moe", "gpt_oss", "llama4_text", "glm4_moe", "deepseek_v3")


@dataclass(frozen=True)
class Layer:
    """One decoder layer: its attention and its feed-forward block (MoE or dense)."""

    attn_params: int  # q, k, v, o weights (the NF4 part)
    attn_extra: int  # attention biases, qk-norm weights, sinks: kept in bf16
    moe: bool
    dense_intermediate: int  # dense MLP width when not moe
    attention_span: int | None  # None = full causal; else a window / chunk (tokens)
    rope_fp32: bool = False  # Llama 4: RoPE as a complex fp32 multiply (saves fp32 copies of q and k)
    qk_norm: bool = False  # Llama 4: parameter-free L2 norm of q and k in fp32 (saves fp32 copies)


@dataclass(frozen=True)
class ModelFacts:
    name: str
    family: str
    source: str  # the file the facts were read from
    hidden: int
    vocab: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: tuple[Layer, ...]
    num_experts: int = 0
    top_k: int = 0
    expert_intermediate: int = 0
    shared_intermediate: int = 0  # 0 = no shared expert
    expert_bias: bool = False  # gpt-oss: biases on the expert projections
    router_bias: bool = False
    tied_embeddings: bool = False
    max_positions: int = 131072

    # ------------------------------------------------------------------ derived counts
    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def moe_layers(self) -> int:
        return sum(1 for la in self.layers if la.moe)

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def routed_expert_params_per_layer(self) -> int:
        """Weights of all routed experts of one MoE layer (gate, up, down for every expert)."""
        return self.num_experts * 3 * self.hidden * self.expert_intermediate

    def groups(self) -> dict[str, int]:
        """Parameter count per group. The groups sum to the model's total."""
        h = self.hidden
        g = {"attention": 0, "routed_experts": 0, "shared_experts": 0, "dense_mlp": 0, "embed_tokens": 0,
             "lm_head": 0, "norms": 0, "router": 0, "biases_and_extras": 0}
        for la in self.layers:
            g["attention"] += la.attn_params
            g["biases_and_extras"] += la.attn_extra
            g["norms"] += 2 * h
            if la.moe:
                g["routed_experts"] += self.routed_expert_params_per_layer()
                if self.expert_bias:
                    g["biases_and_extras"] += self.num_experts * (2 * self.expert_intermediate + h)
                g["shared_experts"] += 3 * h * self.shared_intermediate
                g["router"] += h * self.num_experts + (self.num_experts if self.router_bias else 0)
            else:
                g["dense_mlp"] += 3 * h * la.dense_intermediate
        g["norms"] += h  # final norm
        g["embed_tokens"] = self.vocab * h
        g["lm_head"] = 0 if self.tied_embeddings else self.vocab * h
        return g

    def total_params(self) -> int:
        return sum(self.groups().values())

    def active_params_per_token(self) -> int:
        """Weights a token is multiplied by: attention, shared / dense MLP, top_k routed experts, router,
        lm_head (embeddings are a lookup, not a matmul)."""
        g = self.groups()
        routed = g["routed_experts"] * self.top_k // self.num_experts if self.num_experts else 0
        head = g["lm_head"] or g["embed_tokens"]
        return g["attention"] + g["shared_experts"] + g["dense_mlp"] + routed + g["router"] + head

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name, "family": self.family, "source": self.source, "layers": self.num_layers,
            "moe_layers": self.moe_layers, "hidden": self.hidden, "vocab": self.vocab, "heads": self.heads,
            "kv_heads": self.kv_heads, "head_dim": self.head_dim, "experts": self.num_experts, "top_k": self.top_k,
            "expert_intermediate": self.expert_intermediate, "shared_intermediate": self.shared_intermediate,
            "total_params": self.total_params(), "active_params_per_token": self.active_params_per_token(),
            "params_by_group": self.groups(),
        }


# ---------------------------------------------------------------------------------------------- reading

def resolve_config_path(model: str) -> Path:
    """Preset name, local directory / config.json, or hub id (preset alias, then the local HF cache)."""
    from ..config import TINY_MODEL

    if model == TINY_MODEL:
        from ..assets import tiny_model_dir

        return tiny_model_dir() / "config.json"
    if model in PRESETS:
        return PRESETS_DIR / f"{model}.json"
    p = Path(model).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ConfigError(f"{p}: no config.json in this directory; point --model at a model directory, a "
                              f"config.json, a preset ({', '.join(PRESETS)}) or a hub id.")
        return p / "config.json"
    if p.is_file():
        return p
    alias = HUB_ALIASES.get(model.lower())
    if alias:
        return PRESETS_DIR / f"{alias}.json"
    if model.count("/") == 1 and not model.startswith((".", "/")):
        return _hub_config(model)
    raise ConfigError(f"model {model!r}: not a preset ({', '.join(PRESETS)}), not an existing path and not a "
                      f"hub id (owner/name).")


def _hub_config(repo_id: str) -> Path:
    from ..errors import MoefitError
    from ..hub import snapshot  # fails in seconds when the hub cannot be reached

    try:
        return snapshot(repo_id, ["config.json"]) / "config.json"
    except MoefitError as e:
        raise ConfigError(f"{e} Or download its config.json and pass that path, or use a preset "
                          f"({', '.join(PRESETS)}).") from None


def load_model_facts(model: str) -> ModelFacts:
    path = resolve_config_path(model)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: config.json not found.") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON at line {e.lineno}, column {e.colno}: {e.msg}.") from None
    return facts_from_config(raw, name=model, source=str(path))


def facts_from_config(raw: dict[str, Any], *, name: str = "model", source: str = "config.json") -> ModelFacts:
    cfg = raw.get("text_config") if isinstance(raw.get("text_config"), dict) else raw
    family = cfg.get("model_type") or raw.get("model_type")
    if family == "llama4":
        family = "llama4_text"
    if family not in FAMILIES:
        raise ConfigError(f"{source}: model_type {family!r} is not one moefit plans for; supported: "
                          f"{', '.join(FAMILIES)} (and llama4).")

    def need(key: str) -> Any:
        if key not in cfg:
            raise ConfigError(f"{source}: missing '{key}' (needed to count a {family} model's parameters).")
        return cfg[key]

    h, n_layers, vocab, heads = need("hidden_size"), need("num_hidden_layers"), need("vocab_size"), \
        need("num_attention_heads")
    kv = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or h // heads
    q, kvd = heads * head_dim, kv * head_dim
    attn = h * q + 2 * h * kvd + q * h
    bias = (q + 2 * kvd + h) if cfg.get("attention_bias") else 0
    tied = bool(raw.get("tie_word_embeddings", cfg.get("tie_word_embeddings", False)))
    common = dict(name=name, family=family, source=source, hidden=h, vocab=vocab, heads=heads, kv_heads=kv,
                  head_dim=head_dim, tied_embeddings=tied,
                  max_positions=int(cfg.get("max_position_embeddings") or 131072))

    if family == "llama":
        inter = need("intermediate_size")
        layers = tuple(Layer(attn, bias, False, inter, None) for _ in range(n_layers))
        return ModelFacts(layers=layers, **common)
    if family == "mixtral":
        window = cfg.get("sliding_window")
        layers = tuple(Layer(attn, bias, True, 0, window) for _ in range(n_layers))
        return ModelFacts(layers=layers, num_experts=need("num_local_experts"), top_k=need("num_experts_per_tok"),
                          expert_intermediate=need("intermediate_size"), **common)
    if family == "qwen3_moe":
        qk_norm = 2 * head_dim
        step = cfg.get("decoder_sparse_step", 1) or 1
        mlp_only = set(cfg.get("mlp_only_layers") or [])
        # the hub's config.json says num_experts; transformers >= 5.2x writes num_local_experts (an alias)
        n_exp = cfg["num_local_experts"] if "num_local_experts" in cfg and "num_experts" not in cfg \
            else need("num_experts")
        window = cfg.get("sliding_window") if cfg.get("use_sliding_window") else None
        max_window_layers = cfg.get("max_window_layers", n_layers)
        layers = tuple(
            Layer(attn, bias + qk_norm, i not in mlp_only and n_exp > 0 and (i + 1) % step == 0,
                  need("intermediate_size"), window if i >= max_window_layers else None)
            for i in range(n_layers))
        return ModelFacts(layers=layers, num_experts=n_exp, top_k=need("num_experts_per_tok"),
                          expert_intermediate=need("moe_intermediate_size"), **common)
    if family == "gpt_oss":
        sinks = heads
        window = cfg.get("sliding_window")
        types = cfg.get("layer_types") or ["sliding_attention" if i % 2 == 0 else "full_attention"
                                           for i in range(n_layers)]
        layers = tuple(Layer(attn, bias + sinks, True, 0, window if types[i] == "sliding_attention" else None)
                       for i in range(n_layers))
        return ModelFacts(layers=layers, num_experts=need("num_local_experts"),
                          top_k=cfg.get("num_experts_per_tok") or need("experts_per_token"),
                          expert_intermediate=need("intermediate_size"), expert_bias=True, router_bias=True,
                          **common)
    if family in ("glm4_moe", "deepseek_v3"):
        return _deepseek_style(cfg, family, need, common)
    # llama4_text: qk-norm is a parameter-free L2 norm; every MoE layer has a shared expert.
    moe_layers = set(_llama4_moe_layers(cfg, n_layers))
    rope = _llama4_no_rope_layers(cfg, n_layers)
    chunk = cfg.get("attention_chunk_size")
    qk = bool(cfg.get("use_qk_norm", True))
    layers = tuple(Layer(attn, bias, i in moe_layers, cfg.get("intermediate_size_mlp", 16384),
                         chunk if (rope[i] and chunk) else None, bool(rope[i]), qk and bool(rope[i]))
                   for i in range(n_layers))
    inter = need("intermediate_size")
    return ModelFacts(layers=layers, num_experts=need("num_local_experts"), top_k=need("num_experts_per_tok"),
                      expert_intermediate=inter, shared_intermediate=inter, **common)


def _llama4_moe_layers(cfg: dict[str, Any], n_layers: int) -> list[int]:
    """Llama4TextConfig: `moe_layers` defaults to every `interleave_moe_layer_step`-th layer (step-1, 2·step-1…)."""
    if cfg.get("moe_layers") is not None:
        return list(cfg["moe_layers"])
    step = cfg.get("interleave_moe_layer_step", 1) or 1
    return list(range(step - 1, n_layers, step))


def _llama4_no_rope_layers(cfg: dict[str, Any], n_layers: int) -> list[int]:
    """Llama4TextConfig: an empty `no_rope_layers` means 1 (RoPE, chunked attention) except every 4th layer."""
    given = cfg.get("no_rope_layers")
    if given:
        return list(given)
    interval = cfg.get("no_rope_layer_interval", 4)
    return [int((i + 1) % interval != 0) for i in range(n_layers)]


def _deepseek_style(cfg: dict[str, Any], family: str, need, common: dict[str, Any]) -> ModelFacts:
    """GLM-4.5 / DeepSeek-V3: the first `first_k_dense_replace` layers dense, then routed experts plus
    `n_shared_experts` shared ones (one MLP of n x moe_intermediate_size) and a router with a score-correction
    bias. GLM-4.5: GQA with q/k/v biases (none on o). DeepSeek-V3: multi-head latent attention (low-rank q and kv
    with their norms); its heads are counted as full heads of qk_nope + qk_rope dims, as transformers runs them."""
    h, n_layers, heads = common["hidden"], need("num_hidden_layers"), common["heads"]
    bias_on = bool(cfg.get("attention_bias"))
    if family == "deepseek_v3":
        nope, rope, v_dim, kv_rank = need("qk_nope_head_dim"), need("qk_rope_head_dim"), need("v_head_dim"), \
            need("kv_lora_rank")
        q_rank = cfg.get("q_lora_rank")
        qk = nope + rope
        q = h * q_rank + q_rank * heads * qk if q_rank else h * heads * qk
        attn = q + h * (kv_rank + rope) + kv_rank * heads * (nope + v_dim) + heads * v_dim * h
        extra = (q_rank or 0) + kv_rank + (((q_rank or 0) + kv_rank + rope + h) if bias_on else 0)
        common = {**common, "head_dim": qk, "kv_heads": heads}
    else:
        q, kvd = heads * common["head_dim"], common["kv_heads"] * common["head_dim"]
        attn = 2 * h * q + 2 * h * kvd
        extra = (q + 2 * kvd if bias_on else 0) + (2 * common["head_dim"] if cfg.get("use_qk_norm") else 0)
    first_dense = int(cfg.get("first_k_dense_replace") or 0)
    layers = tuple(Layer(attn, extra, i >= first_dense, need("intermediate_size"), None) for i in range(n_layers))
    inter = need("moe_intermediate_size")
    return ModelFacts(layers=layers, num_experts=need("n_routed_experts"), top_k=need("num_experts_per_tok"),
                      expert_intermediate=inter, shared_intermediate=inter * int(cfg.get("n_shared_experts") or 0),
                      router_bias=True, **common)
