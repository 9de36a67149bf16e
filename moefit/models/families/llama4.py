"""Llama 4 (Scout, Maverick): top-k of the router logits, sigmoid of the selected ones scales the expert *input*;
one shared expert; routed experts fused on disk (`gate_up_proj` [E, H, 2I]) or per expert."""

from .spec import FamilySpec, FusedExperts, MoESpec, PerExpert

_FUSED = FusedExperts(transposed=True)

SPEC = FamilySpec(
    name="llama4_text",
    model_types=("llama4_text", "llama4"),
    architectures=("Llama4ForCausalLM", "Llama4ForConditionalGeneration"),
    modeling="transformers.models.llama4.modeling_llama4",
    mlp="feed_forward",
    moe=MoESpec(
        block_class="Llama4TextMoe",
        router="router",
        shared_expert="shared_expert",
        num_experts="num_local_experts",
        expert_intermediate="intermediate_size",
        routing="sigmoid_of_topk_logits",
        scale_inputs=True,
        returns_router_logits=True,
        output_feeds_residual=True,
        on_disk=(_FUSED, PerExpert()),
        in_memory=_FUSED,
    ),
)
