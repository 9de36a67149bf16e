"""gpt-oss (20b, 120b): router with a bias, top-k of its logits, softmax over those k, scaling the expert output;
experts with biases and a clamped SwiGLU (alpha 1.702, limit 7, `(up + 1)`), gate and up interleaved in one fused
tensor [E, H, 2I]. The hub checkpoints store the expert weights MXFP4 (`*_blocks` + `*_scales`, [E, out, in/32,
16]); moefit decodes them at load, then NF4. bf16 copies (and what save_pretrained writes) hold the in-memory
layout."""

from .spec import FamilySpec, FusedExperts, MoESpec

_BIASES = dict(gate_up_bias="gate_up_proj_bias", down_bias="down_proj_bias", interleaved=True)
_IN_MEMORY = FusedExperts(transposed=True, **_BIASES)

SPEC = FamilySpec(
    name="gpt_oss",
    model_types=("gpt_oss",),
    architectures=("GptOssForCausalLM",),
    modeling="transformers.models.gpt_oss.modeling_gpt_oss",
    attention_sinks=True,
    moe=MoESpec(
        block_class="GptOssMLP",
        router="router",
        num_experts="num_local_experts",
        expert_intermediate="intermediate_size",
        routing="softmax_of_topk_logits",
        scale_inputs=False,
        returns_router_logits=True,
        output_feeds_residual=True,
        on_disk=(FusedExperts(mxfp4=True, **_BIASES), _IN_MEMORY),
        in_memory=_IN_MEMORY,
        activation="clamped_swiglu",
        activation_args=(("alpha", "alpha"), ("limit", "limit")),  # GptOssExperts.alpha / .limit
        hidden_act=None,
    ),
)
