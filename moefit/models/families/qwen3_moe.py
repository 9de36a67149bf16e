"""Qwen3-MoE (30B-A3B, 235B-A22B): softmax over all experts, top-k, renormalised when `norm_topk_prob`; the weight
scales the expert *output*; no shared expert. Hub checkpoints hold one `gate/up/down_proj` per expert;
transformers 5 fuses them in memory ([E, 2I, H]) and writes them back per expert."""

from .spec import FamilySpec, FusedExperts, MoESpec, PerExpert

SPEC = FamilySpec(
    name="qwen3_moe",
    model_types=("qwen3_moe",),
    architectures=("Qwen3MoeForCausalLM",),
    modeling="transformers.models.qwen3_moe.modeling_qwen3_moe",
    moe=MoESpec(
        block_class="Qwen3MoeSparseMoeBlock",
        router="gate",
        num_experts="num_experts",
        expert_intermediate="moe_intermediate_size",
        routing="softmax_topk",
        normalize_topk="norm_topk_prob",
        scale_inputs=False,
        returns_router_logits=False,
        output_feeds_residual=True,
        on_disk=(PerExpert(), FusedExperts()),
        in_memory=FusedExperts(),
    ),
)
