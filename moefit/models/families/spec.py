"""What moefit needs to know about a model family, as data: one `FamilySpec` per family module in this package.

torch-free (the planner reads it). The code that acts on a spec lives elsewhere and never branches on a family's
name: `models.build` (which HF modules to replace and how), `moe.routing` (the routing rule, by name),
`models.expert_layout` (checkpoint tensors <-> expert banks), the loader, the exports and the planner.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class FusedExperts:
    """All experts of a layer in two tensors, `<experts>.<gate_up>` (gate outputs, then up outputs) and
    `<experts>.<down>`.

    transposed=True: each expert's slice is [in, out] (Llama 4: gate_up_proj [E, H, 2I], down_proj [E, I, H]);
    False: [out, in] as nn.Linear weights (transformers 5's in-memory Qwen3-MoE / Mixtral: [E, 2I, H], [E, H, I]).
    interleaved: gate and up alternate along the output (gpt-oss: gate = [..., 0::2], up = [..., 1::2]).
    gate_up_bias / down_bias: names of per-expert bias tensors ([E, 2I], [E, H]), None when the family has none.
    mxfp4: the weights are MXFP4 `<name>_blocks` [E, out, in/32, 16] (two FP4 values a byte) and `<name>_scales`
    [E, out, in/32] (power-of-two exponents + 127), as gpt-oss ships them; moefit decodes them at load.
    """

    gate_up: str = "gate_up_proj"
    down: str = "down_proj"
    transposed: bool = False
    interleaved: bool = False
    gate_up_bias: str | None = None
    down_bias: str | None = None
    mxfp4: bool = False

    @property
    def has_bias(self) -> bool:
        return self.gate_up_bias is not None


@dataclass(frozen=True)
class PerExpert:
    """One nn.Linear weight [out, in] per expert and projection: `<experts>.<e>.<name>.weight`."""

    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"

    def names(self) -> dict[str, str]:
        """moefit's projection name (gate / up / down) -> this layout's name."""
        return {"gate": self.gate, "up": self.up, "down": self.down}


@dataclass(frozen=True)
class MoESpec:
    """The family's routed MoE block, which moefit replaces by `moe.block.MoefitMoE`."""

    block_class: str  # the transformers class of the block, in FamilySpec.modeling
    router: str  # attribute of the block that holds the router weight [E, H]
    num_experts: str  # config attribute: number of routed experts
    expert_intermediate: str  # config attribute: one routed expert's intermediate width
    routing: str  # name of the routing function in moe.routing
    scale_inputs: bool  # the router weight scales the expert's input (Llama 4), else its output
    returns_router_logits: bool  # the block returns (output, router_logits), not the output alone
    # The decoder layer adds the block's output straight to the residual stream (no norm or gate after it), so the
    # recomputation of a checkpointed layer may skip the frozen matmuls whose output only feeds that sum.
    output_feeds_residual: bool
    on_disk: tuple[FusedExperts | PerExpert, ...]  # expert layouts hub checkpoints use (the loader reads each)
    in_memory: FusedExperts  # how transformers holds the experts (names of its parameters; PEFT targets these)
    top_k: str = "num_experts_per_tok"  # config attribute
    routing_args: tuple[tuple[str, str], ...] = ()  # (routing option, config attribute) pairs
    router_fp32: bool = False  # router logits in fp32 from an fp32 router weight (as transformers does)
    normalize_topk: bool | str = False  # renormalise the top-k weights: a constant, or the config attribute saying so
    experts: str = "experts"  # attribute of the block holding the routed experts
    shared_expert: str | None = None  # attribute of the block holding the shared expert (an MLP of nn.Linear)
    activation: str = "silu_glu"  # expert MLP, a name in moe.experts.ACTIVATIONS
    # (activation keyword, attribute of transformers' experts module) pairs: the constants transformers itself uses,
    # read from its module, not the config (5.17 hard-codes gpt-oss's alpha and limit; 5.24 reads config.swiglu_*)
    activation_args: tuple[tuple[str, str], ...] = ()
    hidden_act: str | None = "silu"  # the config's hidden_act the activation implements (None: not read)

    def activation_kwargs(self, hf_experts: Any) -> dict[str, Any]:
        """The activation's keyword arguments, from transformers' experts module of the block moefit replaces."""
        return {kw: getattr(hf_experts, attr) for kw, attr in self.activation_args}

    def routing_options(self, config: Any) -> dict[str, Any]:
        return {opt: getattr(config, attr) for opt, attr in self.routing_args}

    def normalize(self, config: Any) -> bool:
        if isinstance(self.normalize_topk, str):
            return bool(getattr(config, self.normalize_topk))
        return self.normalize_topk


@dataclass(frozen=True)
class FamilySpec:
    name: str  # model_type of the text model (the config moefit builds)
    model_types: tuple[str, ...]  # every config.json model_type of the family (e.g. a multimodal wrapper's)
    architectures: tuple[str, ...]  # transformers classes of its hub checkpoints
    modeling: str  # the transformers module that defines the classes
    attention: str = "self_attn"  # attribute of a decoder layer: attention (q/k/v/o_proj inside)
    mlp: str = "mlp"  # attribute of a decoder layer: the MoE block or dense MLP
    # Learned per-head softmax sinks in the attention (gpt-oss): run through moefit.models.sink_attention's fused
    # SDPA form, since transformers has only an eager path for them.
    attention_sinks: bool = False
    moe: MoESpec | None = None  # None: a dense family
    # Checkpoint key fragments -> module path fragments, where the hub name differs from transformers' module
    # (Mixtral's `.block_sparse_moe.` is `.mlp.` in memory).
    key_renames: tuple[tuple[str, str], ...] = ()
    # LoRA target (module leaf name, e.g. q_proj) -> the leaf names it means in this family, where they differ
    # (DeepSeek-V3's latent attention: q_a_proj, q_b_proj, ...)
    lora_aliases: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def lora_leaves(self, targets: list[str]) -> set[str]:
        """Module leaf names that the LoRA targets (already *_proj names) cover in this family."""
        aliases = dict(self.lora_aliases)
        return {leaf for t in targets for leaf in aliases.get(t, (t,))}
