"""Dense Llama (Llama 3.x): no MoE block; every nn.Linear becomes a MoefitLinear."""

from .spec import FamilySpec

SPEC = FamilySpec(
    name="llama",
    model_types=("llama",),
    architectures=("LlamaForCausalLM",),
    modeling="transformers.models.llama.modeling_llama",
)
