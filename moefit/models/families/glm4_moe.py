"""GLM-4.5 (Air, full): the first `first_k_dense_replace` layers dense; then sigmoid router scores with a
score-correction bias deciding the choice, group-limited top-k, renormalised, times `routed_scaling_factor`,
scaling the expert output; one shared-experts MLP beside the routed ones. Router logits in fp32. Hub
checkpoints hold one `gate/up/down_proj` per expert (fused in memory by transformers 5), and an MTP layer
transformers does not build (skipped at load, copied through by a merged export)."""

from .spec import FamilySpec, FusedExperts, MoESpec, PerExpert

SPEC = FamilySpec(
    name="glm4_moe",
    model_types=("glm4_moe",),
    architectures=("Glm4MoeForCausalLM",),
    modeling="transformers.models.glm4_moe.modeling_glm4_moe",
    moe=MoESpec(
        block_class="Glm4MoeMoE",
        router="gate",
        shared_expert="shared_experts",
        num_experts="n_routed_experts",
        expert_intermediate="moe_intermediate_size",
        routing="sigmoid_group_topk",
        routing_args=(("n_group", "n_group"), ("topk_group", "topk_group"), ("scaling", "routed_scaling_factor")),
        normalize_topk="norm_topk_prob",
        router_fp32=True,
        scale_inputs=False,
        returns_router_logits=False,
        output_feeds_residual=True,
        on_disk=(PerExpert(), FusedExperts()),
        in_memory=FusedExperts(),
    ),
)
