"""DeepSeek-V3: GLM-4.5's MoE (dense first layers, sigmoid + correction-bias group-limited top-k with scaling factor,
shared expert, fp32 router logits, MTP layer not built) with multi-head latent attention: low-rank q and kv
projections, which the LoRA targets q / k / v name here."""

import dataclasses

from .glm4_moe import SPEC as GLM4_MOE
from .spec import FamilySpec

SPEC = FamilySpec(
    name="deepseek_v3",
    model_types=("deepseek_v3",),
    architectures=("DeepseekV3ForCausalLM",),
    modeling="transformers.models.deepseek_v3.modeling_deepseek_v3",
    lora_aliases=(("q_proj", ("q_proj", "q_a_proj", "q_b_proj")),  # q_proj when q_lora_rank is null
                  ("k_proj", ("kv_a_proj_with_mqa", "kv_b_proj")),
                  ("v_proj", ("kv_a_proj_with_mqa", "kv_b_proj"))),
    moe=dataclasses.replace(GLM4_MOE.moe, block_class="DeepseekV3MoE"),
)
