"""Mixtral (8x7B, 8x22B): softmax over all experts, top-k, renormalised; the weight scales the expert *output*.
Hub checkpoints: `block_sparse_moe.experts.<e>.w1/w3/w2` (gate/up/down); transformers 5 holds them fused under
`mlp.experts` ([E, 2I, H]) and writes the hub names back."""

from .spec import FamilySpec, FusedExperts, MoESpec, PerExpert

SPEC = FamilySpec(
    name="mixtral",
    model_types=("mixtral",),
    architectures=("MixtralForCausalLM",),
    modeling="transformers.models.mixtral.modeling_mixtral",
    key_renames=((".block_sparse_moe.", ".mlp."),),
    moe=MoESpec(
        block_class="MixtralSparseMoeBlock",
        router="gate",
        num_experts="num_local_experts",
        expert_intermediate="intermediate_size",
        routing="softmax_topk",
        normalize_topk=True,
        scale_inputs=False,
        returns_router_logits=False,
        output_feeds_residual=True,
        on_disk=(PerExpert(gate="w1", up="w3", down="w2"), FusedExperts()),
        in_memory=FusedExperts(),
    ),
)
