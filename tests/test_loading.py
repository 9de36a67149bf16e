"""Streaming loader: both model classes, both expert layouts, sharded checkpoints, host memory while loading."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file
from transformers import Llama4Config, Llama4ForConditionalGeneration

import moefit
from moefit.errors import MoefitError
from tests.families import rel
from tests.test_engine_parity import CONFIGS, tiny_config, write_checkpoint


def _load(path, **kw):
    return moefit.load_model(str(path), quantization="none", dtype=torch.float32, attn_implementation="eager", **kw)


def test_conditional_generation_layout_loads_text_model_and_skips_vision(tmp_path):
    text = tiny_config(**CONFIGS["top1-4e-norope"])
    vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=28,
                  patch_size=14, vision_output_dim=32, projector_input_dim=32, projector_output_dim=32,
                  pixel_shuffle_ratio=0.5)
    config = Llama4Config(text_config=text.to_dict(), vision_config=vision)
    torch.manual_seed(0)
    full = Llama4ForConditionalGeneration(config).float().eval()
    full.save_pretrained(tmp_path)
    keys = set()
    for f in tmp_path.glob("*.safetensors"):
        from safetensors import safe_open
        with safe_open(str(f), "pt") as h:
            keys.update(h.keys())
    assert any(k.startswith("language_model.model.layers.0.feed_forward.experts") for k in keys)
    assert any(k.startswith("vision_model.") for k in keys)

    model = _load(tmp_path)
    assert model.load_report.tensors_skipped > 0
    ids = torch.randint(3, text.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    text_model = full.language_model
    text_model.config._attn_implementation = "eager"
    with torch.no_grad():
        assert rel(model(ids).logits, text_model(ids).logits) < 1e-4


def _per_expert_state(fused: dict[str, torch.Tensor], inter: int) -> dict[str, torch.Tensor]:
    out = {}
    for k, t in fused.items():
        if k.endswith("experts.gate_up_proj"):
            base = k[: -len("gate_up_proj")]
            for e in range(t.shape[0]):
                out[f"{base}{e}.gate_proj.weight"] = t[e, :, :inter].t().contiguous()
                out[f"{base}{e}.up_proj.weight"] = t[e, :, inter:].t().contiguous()
        elif k.endswith("experts.down_proj"):
            base = k[: -len("down_proj")]
            for e in range(t.shape[0]):
                out[f"{base}{e}.down_proj.weight"] = t[e].t().contiguous()
        else:
            out[k] = t.contiguous()
    return out


def test_per_expert_layout_sharded_matches_fused(tmp_path):
    cfg = tiny_config(**CONFIGS["top2-4e-rope"])
    fused_dir, split_dir = tmp_path / "fused", tmp_path / "split"
    ref = write_checkpoint(fused_dir, cfg)
    state = _per_expert_state({k: v.detach() for k, v in ref.state_dict().items()}, cfg.intermediate_size)
    split_dir.mkdir()
    (split_dir / "config.json").write_text((fused_dir / "config.json").read_text())
    names = sorted(state)
    half = len(names) // 2
    weight_map = {}
    for i, part in enumerate((names[:half], names[half:])):
        fname = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({k: state[k] for k in part}, str(split_dir / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in part})
    (split_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

    a, b = _load(fused_dir), _load(split_dir)
    ids = torch.randint(3, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)


def test_missing_tensor_is_a_clear_error(tmp_path):
    cfg = tiny_config(**CONFIGS["top1-4e-norope"])
    ref = write_checkpoint(tmp_path / "full", cfg)
    state = {k: v.detach().contiguous() for k, v in ref.state_dict().items() if "layers.1.self_attn.q_proj" not in k}
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "config.json").write_text((tmp_path / "full" / "config.json").read_text())
    save_file(state, str(tmp_path / "cut" / "model.safetensors"))
    with pytest.raises(MoefitError, match=r"lacks 1 tensors.*layers\.1\.self_attn\.q_proj\.weight"):
        _load(tmp_path / "cut")


def test_not_a_model_dir_is_a_clear_error(tmp_path):
    with pytest.raises(MoefitError, match="no config.json"):
        moefit.load_model(str(tmp_path))


MEMORY_PROBE = textwrap.dedent("""
    import json, sys, gc
    import psutil, torch
    import moefit
    from moefit.models import load_model
    from moefit.loading import resolve_source, safetensors_files  # import everything before measuring
    import transformers.models.llama4.modeling_llama4  # noqa
    gc.collect()
    base = psutil.Process().memory_info().rss
    model = load_model(sys.argv[1], quantization="nf4", dtype=torch.bfloat16)
    # VmHWM: this process's own high-water mark (ru_maxrss would carry the parent's across exec).
    peak = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    quantized = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    print(json.dumps({"base": base, "peak": peak, "quantized": quantized,
                      "largest": model.load_report.largest_tensor_bytes}))
""")


def test_peak_host_memory_while_loading(tmp_path):
    """Peak RSS growth while loading < 2 x the largest tensor + the quantized model (fused layout, where the
    largest tensor is a whole layer's experts)."""
    cfg = tiny_config(hidden_size=512, intermediate_size=1024, intermediate_size_mlp=1024, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=2, head_dim=64, num_local_experts=16,
                      vocab_size=1024, no_rope_layers=[1, 1, 1, 0])
    torch.manual_seed(0)
    from transformers import Llama4ForCausalLM
    with torch.device("meta"):
        model = Llama4ForCausalLM(cfg)
    state = {k: torch.randn(v.shape, dtype=torch.bfloat16) * 0.02 for k, v in model.state_dict().items()}
    ckpt_bytes = sum(t.numel() * 2 for t in state.values())
    cfg.save_pretrained(tmp_path)
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    del state
    out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(tmp_path)], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    m = json.loads(out.stdout.strip().splitlines()[-1])
    growth = m["peak"] - m["base"]
    budget = 2 * m["largest"] + m["quantized"]
    print({k: f"{v / 2**20:.1f} MiB" for k, v in m.items()}, f"checkpoint {ckpt_bytes / 2**20:.0f} MiB")
    assert ckpt_bytes > 1.5 * budget  # holding the bf16 checkpoint would break the budget
    assert growth < budget, f"RSS grew {growth / 2**20:.0f} MiB; budget {budget / 2**20:.0f} MiB"


@pytest.mark.parametrize("tied", [False, True])
def test_dense_llama_loads_and_matches_transformers(tmp_path, tied):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, max_position_embeddings=128,
                      tie_word_embeddings=tied)
    torch.manual_seed(0)
    ref = LlamaForCausalLM(cfg).float().eval()
    ref.save_pretrained(tmp_path)
    ref.config._attn_implementation = "eager"
    model = _load(tmp_path)
    if tied:
        assert model.hf.lm_head.weight is model.hf.get_input_embeddings().weight
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert rel(model(ids).logits, ref(ids).logits) < 1e-4
