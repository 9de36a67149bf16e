"""Every MoE family moefit trains, against transformers itself on tiny checkpoints that transformers writes (the
hub's on-disk expert layout): fp32 logits and LoRA gradients, NF4 logits on the NF4-round-tripped weights, expert
work independent of the number of experts, and `moefit train` -> `moefit export` (merged and PEFT adapter).

The models come from tests/families.py: a family gets these tests by adding its tiny config there.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch.func import functional_call
from torch.utils.flop_counter import FlopCounterMode

import moefit
from moefit.lora import add_lora, load_adapter, lora_parameters
from moefit.models.families import FusedExperts, PerExpert
from moefit.moe.experts import MoefitExperts
from moefit.quant.nf4 import FrozenWeight, NF4Weight
from tests.families import (
    CASES,
    FAMILY_CASES,
    TOKENIZER_FILES,
    experts_override,
    lora_deltas,
    randomize_lora,
    reference_params,
    rel,
    write_checkpoint,
    write_fp8_copy,
    write_mxfp4_copy,
)


def _load(path, quantization: str = "none"):
    return moefit.load_model(str(path), quantization=quantization, dtype=torch.float32, attn_implementation="eager")


def _ids(vocab: int, seed: int, shape=(2, 24)) -> torch.Tensor:
    return torch.randint(3, vocab, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("case", FAMILY_CASES)
def test_checkpoint_holds_the_hub_expert_layout(tmp_path, case):
    """What save_pretrained wrote is the layout the spec names first (the hub's), not transformers' in-memory one."""
    write_checkpoint(tmp_path, CASES[case])
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    moe = CASES[case].spec().moe
    hub = moe.on_disk[0]
    if isinstance(hub, PerExpert):
        assert any(k.endswith(f".{moe.experts}.0.{hub.gate}.weight") for k in keys), sorted(keys)[:8]
        assert not any(k.endswith(f".{moe.experts}.gate_up_proj") for k in keys)
    else:
        assert isinstance(hub, FusedExperts) and any(k.endswith(f".{moe.experts}.{hub.gate_up}") for k in keys)


@pytest.mark.parametrize("case", FAMILY_CASES)
def test_bf16_build_keeps_in_fp32_what_transformers_keeps(tmp_path, case):
    """Loaded in bf16, every tensor moefit holds unquantized under transformers' name has the dtype
    transformers' own from_pretrained gives it (the routers' score-correction bias in fp32, on 5.17 too)."""
    from transformers import AutoModelForCausalLM

    write_checkpoint(tmp_path, CASES[case])
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    model = moefit.load_model(str(tmp_path), quantization="nf4", dtype=torch.bfloat16)
    expected = {n: t.dtype for n, t in [*ref.named_parameters(), *ref.named_buffers()]}
    got = {n: t.dtype for n, t in [*model.hf.named_parameters(), *model.hf.named_buffers()] if n in expected}
    assert len(got) > 10 and got == {n: expected[n] for n in got}
    assert case not in ("glm4_moe", "deepseek_v3") or torch.float32 in got.values()


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers_unquantized(tmp_path, case):
    ref = write_checkpoint(tmp_path, CASES[case])
    model = _load(tmp_path)
    assert any(isinstance(m, MoefitExperts) for m in model.modules())
    ids = _ids(ref.config.vocab_size, 1)
    with torch.no_grad():
        expected = ref(ids).logits
        got = model(ids).logits
    assert rel(got, expected) < 1e-4
    out = model(ids, labels=ids)
    assert abs(out.loss.item() - ref(ids, labels=ids).loss.item()) < 1e-4


@pytest.mark.parametrize("case", list(CASES))
def test_lora_logits_and_gradients_match_transformers(tmp_path, case):
    ref = write_checkpoint(tmp_path, CASES[case])
    model = _load(tmp_path)
    params = add_lora(model, r=4, alpha=8, dropout=0.0, expert_r=2)
    assert any(n.endswith("gate_lora_A") for n in params)  # routed experts have LoRA too
    randomize_lora(model)
    model.train()
    ids = _ids(ref.config.vocab_size, 2, (2, 20))
    out = model(ids, labels=ids, return_logits=True)
    out.loss.backward()
    ours = {n: p.grad.clone() for n, p in params.items()}
    for p in params.values():
        p.grad = None

    base = reference_params(model)
    merged = {k: base[k] + v for k, v in lora_deltas(model).items()}
    ref.train()
    ref_out = functional_call(ref, {**base, **merged}, args=(ids,), kwargs={"labels": ids})
    assert rel(out.logits.detach(), ref_out.logits.detach()) < 1e-4
    ref_out.loss.backward()
    for n, p in params.items():
        assert p.grad is not None, n
        assert rel(ours[n], p.grad) < 1e-4, n


@pytest.mark.parametrize("case", list(CASES))
def test_nf4_logits_match_transformers_on_dequantized_weights(tmp_path, case):
    ref = write_checkpoint(tmp_path, CASES[case])
    model = _load(tmp_path, "nf4")
    ids = _ids(ref.config.vocab_size, 4)
    with torch.no_grad():
        got = model(ids).logits
        expected = functional_call(ref, reference_params(model), args=(ids,)).logits
        original = ref(ids).logits
    assert rel(got, expected) < 1e-4
    assert rel(got, original) > 1e-3  # the NF4 path really quantized


def _expert_work(tmp_path: Path, case: str, num_experts: int, top_k: int, tokens: int) -> tuple[int, int]:
    """(FLOPs inside the routed-expert banks for one forward + backward, rows that reached them)."""
    path = tmp_path / f"{case}-e{num_experts}k{top_k}"
    write_checkpoint(path, CASES[case], **experts_override(CASES[case], num_experts, top_k))
    model = _load(path, "nf4")
    add_lora(model, r=4, alpha=8, dropout=0.0)
    rows = []
    for m in model.modules():
        if isinstance(m, MoefitExperts):
            m.register_forward_pre_hook(lambda mod, args: rows.append(args[0].shape[0]))
    ids = _ids(model.config.vocab_size, 0, (1, tokens))
    counter = FlopCounterMode(display=False)
    with counter:
        model(ids, labels=ids).loss.backward()
    flops = sum(sum(v.values()) for k, v in counter.get_flop_counts().items()
                if k.endswith(f".{CASES[case].spec().moe.experts}"))
    return flops, sum(rows)


@pytest.mark.parametrize("case", FAMILY_CASES)
def test_expert_work_scales_with_top_k_not_num_experts(tmp_path, case):
    tokens = 32
    f4k1, rows4k1 = _expert_work(tmp_path, case, 4, 1, tokens)
    f8k1, rows8k1 = _expert_work(tmp_path, case, 8, 1, tokens)
    f8k2, rows8k2 = _expert_work(tmp_path, case, 8, 2, tokens)
    model_layers = sum(1 for m in _load(tmp_path / f"{case}-e4k1").modules() if isinstance(m, MoefitExperts))
    assert rows4k1 == rows8k1 == model_layers * tokens  # only routed rows reach the experts: tokens x top_k
    assert rows8k2 == 2 * model_layers * tokens
    assert f4k1 > 0 and f8k1 == f4k1  # twice the experts, same work
    assert f8k2 == 2 * f4k1  # twice top_k, twice the work


# ------------------------------------------------------------------ moefit train -> moefit export


@pytest.fixture(scope="module", params=FAMILY_CASES)
def trained(request, tmp_path_factory) -> tuple[Path, Path]:
    """(base checkpoint, run directory) of a short `moefit train` run (NF4, fp32, LoRA on attention, dense MLPs
    and every routed expert) on the shipped chat data."""
    tmp = tmp_path_factory.mktemp(request.param)
    base = tmp / "base"
    write_checkpoint(base, CASES[request.param], tokenizer=True)
    return base, _moefit_train(base, tmp / "run")


def _moefit_train(base: Path, run: Path) -> Path:
    """`moefit train` of a few steps on `base` into `run`."""
    from moefit.cli import main

    sets = {"model": str(base), "train.max_length": 64, "train.grad_accum": 1, "train.max_steps": 3,
            "train.eval_every": 100, "train.save_every": 100, "train.lr": 2e-2, "train.warmup_steps": 0,
            "train.precision": "fp32", "train.num_threads": 2, "train.optimizer": "adamw", "lora.r": 4,
            "lora.alpha": 8, "lora.dropout": 0.0, "lora.expert_r": 2}
    args = ["train", "--output-dir", str(run), "--quiet"]
    for k, v in sets.items():
        args += ["--set", f"{k}={v}"]
    assert main(args) == 0
    assert (run / "adapter_model.safetensors").is_file()
    return run


def _trained_model(base: Path, run: Path, quantization: str):
    model = _load(base, quantization)
    load_adapter(model, run)
    trained_b = [p for n, p in lora_parameters(model).items() if n.endswith("_lora_B") and p.abs().sum() > 0]
    assert trained_b, "training left the routed experts' LoRA B at zero: the export test would not test them"
    return model


def test_train_then_merged_export_loads_in_transformers(trained, tmp_path):
    from transformers import AutoModelForCausalLM

    from moefit.cli import main

    base, run = trained
    out = tmp_path / "merged"
    assert main(["export", str(run), "--merge", "--out", str(out), "--dtype", "float32"]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    with safe_open(str(base / "model.safetensors"), "pt") as f:
        assert set(index["weight_map"]) == set(f.keys())  # the hub layout, as the base
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    ids = _ids(hf.config.vocab_size, 5)
    with torch.no_grad():
        got = hf(ids).logits
        expected = _trained_model(base, run, "nf4")(ids, return_logits=True).logits
        untrained = _load(base, "nf4")(ids, return_logits=True).logits
    assert rel(got, expected) < 1e-3
    assert rel(untrained, expected) > 10 * rel(got, expected)  # the adapter changed the model: the merge is seen


def test_train_then_adapter_export_loads_in_peft(trained, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, run = trained
    out = tmp_path / "adapter"
    report = moefit.export(run, out, merge=False)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["target_parameters"]  # routed experts through PEFT's parameter targets, nothing left aside
    assert not (out / "moefit_expert_lora.safetensors").exists()
    hf = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, attn_implementation="eager")
    peft_model = PeftModel.from_pretrained(hf, out).eval()
    assert sum(1 for n, p in peft_model.named_parameters() if "lora_" in n and p.abs().sum() > 0) \
        == report.tensors_written
    ids = _ids(hf.config.vocab_size, 6)
    with torch.no_grad():
        got = peft_model(input_ids=ids).logits
        expected = _trained_model(base, run, "none")(ids, return_logits=True).logits
    assert rel(got, expected) < 1e-3


def test_train_refuses_a_family_it_cannot_train_before_reading_data(tmp_path, capsys):
    from moefit.cli import main
    from moefit.models.families import supported_names

    model = tmp_path / "olmoe"  # an MoE family moefit has no spec for
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "olmoe", "architectures": ["OlmoeForCausalLM"]}))
    missing_data = tmp_path / "no-such-data.jsonl"  # reading the data first would fail on this instead
    rc = main(["train", "--set", f"model={model}", "--set", f"data.train={missing_data}", "--output-dir",
               str(tmp_path / "run"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "'olmoe'" in err and "no-such-data" not in err
    assert all(name in err for name in supported_names()) and "qwen3_moe" in err and "mixtral" in err
    assert not (tmp_path / "run").exists()


def test_gpt_oss_mxfp4_checkpoint_matches_transformers_dequantized(tmp_path):
    """The hub's MXFP4 experts: moefit decodes them at load (then NF4 or plain); transformers' own MXFP4
    decoding of the same file gives the same logits."""
    from transformers import AutoModelForCausalLM, Mxfp4Config

    write_checkpoint(tmp_path / "bf16", CASES["gpt_oss"])
    mx = write_mxfp4_copy(tmp_path / "bf16", tmp_path / "mxfp4")
    ref = AutoModelForCausalLM.from_pretrained(mx, quantization_config=Mxfp4Config(dequantize=True),
                                               dtype=torch.float32, attn_implementation="eager").eval()
    ref.float()  # transformers 5.17 dequantizes MXFP4 to bf16 whatever the dtype (the values are exact in bf16)
    model = _load(mx)
    ids = _ids(ref.config.vocab_size, 7)
    with torch.no_grad():
        got, expected = model(ids).logits, ref(ids).logits
        unquantized = _load(tmp_path / "bf16")(ids).logits
    assert rel(got, expected) < 1e-4
    assert rel(got, unquantized) > 1e-3  # the MXFP4 values really are the ones loaded
    nf4 = _load(mx, "nf4")
    with torch.no_grad():
        assert rel(nf4(ids).logits, functional_call(ref, reference_params(nf4), args=(ids,)).logits) < 1e-4


def test_a_layer_the_model_class_does_not_build_is_skipped(tmp_path):
    """GLM-4.5-Air's hub checkpoint holds an MTP layer (model.layers.46) that transformers does not build and lists
    in _keys_to_ignore_on_load_unexpected: the loader skips it (and only it); a stray tensor still fails."""
    from safetensors.torch import load_file, save_file

    from moefit.errors import MoefitError

    ref = write_checkpoint(tmp_path, CASES["glm4_moe"])
    state = load_file(str(tmp_path / "model.safetensors"))
    extra = {"model.layers.46.eh_proj.weight": torch.zeros(64, 128),
             "model.layers.46.mlp.experts.0.gate_proj.weight": torch.zeros(32, 64)}
    save_file({**state, **extra}, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    model = _load(tmp_path)
    assert model.load_report.tensors_skipped == len(extra)
    ids = _ids(ref.config.vocab_size, 8)
    with torch.no_grad():
        assert rel(model(ids).logits, ref(ids).logits) < 1e-4
    save_file({**state, "model.layers.0.mlp.stray.weight": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(MoefitError, match="no place in the model"):
        _load(tmp_path)


@pytest.mark.parametrize("case", FAMILY_CASES)
def test_checkpointed_gradients_equal_plain(tmp_path, case):
    """Activation checkpointing with the recomputation shortcuts the family spec allows (skipped down projections,
    kept gate/up outputs) gives the LoRA gradients of a run without it."""
    from tests.test_recompute import _grads

    write_checkpoint(tmp_path, CASES[case])
    model = _load(tmp_path, "nf4")
    add_lora(model, r=4, alpha=8, dropout=0.0)
    randomize_lora(model)
    batches = [_ids(model.config.vocab_size, 9, (2, 16))]
    plain = _grads(model, batches, checkpointing=False)
    for keep in (False, True):
        recomputed = _grads(model, batches, checkpointing=True, keep=keep)
        for n in plain:
            assert torch.allclose(plain[n], recomputed[n], rtol=1e-5, atol=1e-7), (keep, n)


@pytest.mark.parametrize("case", FAMILY_CASES)
def test_bench_builds_and_trains_a_synthetic_model_of_each_family(tmp_path, case):
    """What `moefit bench` measures on the GPU, on CPU: the family's config alone -> NF4 synthetic weights -> steps."""
    from moefit.bench import build_synthetic_model, measure_training
    from moefit.config import LoraConfig

    CASES[case].config().save_pretrained(tmp_path)
    model = build_synthetic_model(str(tmp_path), device="cpu", dtype=torch.float32,
                                  lora=LoraConfig(r=4, alpha=8, dropout=0.0))
    assert all(torch.isfinite(b).all() for b in model.buffers() if b.is_floating_point())
    # every frozen weight holds the random values it was filled with (std = initializer_range), none decodes to 0
    stores = {n: m for n, m in model.named_modules() if isinstance(m, (NF4Weight, FrozenWeight))}
    assert len(stores) > 5
    std = CASES[case].config().initializer_range
    for name, store in stores.items():
        assert 0.5 * std < store.dequantize().float().std() < 2 * std, name
    r = measure_training(model, seq_len=16, batch=1, steps=1, warmup=0, optimizer="adamw")
    assert r["tokens_per_s"] > 0 and torch.isfinite(torch.tensor(r["loss_first"]))
    # ... so the gradients reach every LoRA weight (B starts at 0: the A's only once B has moved; here the B's)
    ids = torch.randint(3, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    model(ids, labels=ids).loss.backward()
    zero = [n for n, p in model.named_parameters() if n.endswith("lora_B") and not p.grad.abs().sum() > 0]
    assert not zero, zero


def test_generate_from_the_run_equals_generate_from_its_merged_export(trained, tmp_path):
    """`moefit generate` on the run directory (NF4 base + adapter) and on the merged export: the same greedy reply,
    through the chat template (generation uses transformers' own loop over moefit's modules)."""
    from moefit.generate import generate_reply, load_chat_model

    _, run = trained
    msg = [{"role": "user", "content": "When are you open?"}]
    reply = generate_reply(load_chat_model(run, device="cpu"), msg, max_new_tokens=8, temperature=0)
    assert reply
    merged = tmp_path / "merged"
    moefit.export(run, merged, dtype="float32")
    assert generate_reply(load_chat_model(merged, device="cpu", quantization="none"), msg, max_new_tokens=8,
                          temperature=0) == reply


def test_gpt_oss_mxfp4_base_trains_and_merges_into_a_plain_checkpoint(tmp_path):
    """Trained on the hub's MXFP4 layout, the merged export holds the experts dequantized in transformers'
    in-memory layout (no quantization_config): plain transformers loads it and gives moefit's logits."""
    from transformers import AutoModelForCausalLM

    write_checkpoint(tmp_path / "bf16", CASES["gpt_oss"], tokenizer=True)
    base = write_mxfp4_copy(tmp_path / "bf16", tmp_path / "mxfp4")
    for f in TOKENIZER_FILES:
        shutil.copy(tmp_path / "bf16" / f, base / f)
    run = _moefit_train(base, tmp_path / "run")
    out = tmp_path / "merged"
    report = moefit.export(run, out, dtype="float32")
    assert any("MXFP4" in n for n in report.notes)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    assert hf.model.layers[0].mlp.experts.gate_up_proj.dtype == torch.float32
    ids = _ids(hf.config.vocab_size, 10)
    with torch.no_grad():
        got = hf(ids).logits
        expected = _trained_model(base, run, "nf4")(ids, return_logits=True).logits
    assert rel(got, expected) < 1e-3


@pytest.mark.parametrize("case", [c for c in FAMILY_CASES if CASES[c].spec().lora_aliases])
def test_lora_targets_reach_the_family_s_own_projections(tmp_path, case):
    """q / k / v name the family's own attention projections (DeepSeek-V3's latent attention: q_a_proj, q_b_proj,
    kv_a_proj_with_mqa, kv_b_proj): every one of them in the model gets LoRA."""
    write_checkpoint(tmp_path, CASES[case])
    model = _load(tmp_path)
    params = add_lora(model, r=4, alpha=8, dropout=0.0, targets=["q", "k", "v", "o"])
    aliased = {leaf for _, leaves in CASES[case].spec().lora_aliases for leaf in leaves}
    present = {n.split(".")[-1] for n, _ in model.hf.named_modules()} & aliased
    assert present and present == {n.split(".")[-2] for n in params if n.split(".")[-2] in aliased}


def test_deepseek_fp8_checkpoint_matches_transformers_and_merges_into_a_plain_checkpoint(tmp_path):
    """The hub's FP8 block-quantized weights: moefit decodes them at load (its logits = transformers' on its own
    dequantizing load), trains on them, and the merged export is a plain checkpoint transformers loads."""
    from transformers import AutoModelForCausalLM, FineGrainedFP8Config

    write_checkpoint(tmp_path / "bf16", CASES["deepseek_v3"], tokenizer=True)
    fp8 = write_fp8_copy(tmp_path / "bf16", tmp_path / "fp8")
    ref = AutoModelForCausalLM.from_pretrained(fp8, quantization_config=FineGrainedFP8Config(dequantize=True),
                                               dtype=torch.float32, attn_implementation="eager").eval()
    ids = _ids(ref.config.vocab_size, 11)
    with torch.no_grad():
        got, expected = _load(fp8)(ids).logits, ref(ids).logits
        unquantized = _load(tmp_path / "bf16")(ids).logits
    assert rel(got, expected) < 1e-4
    assert rel(got, unquantized) > 1e-3  # the FP8 values really are the ones loaded
    run = _moefit_train(fp8, tmp_path / "run")
    out = tmp_path / "merged"
    moefit.export(run, out, dtype="float32")
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert not any(k.endswith("_scale_inv") for k in index["weight_map"])
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        merged, trained = hf(ids).logits, _trained_model(fp8, run, "nf4")(ids, return_logits=True).logits
    assert rel(merged, trained) < 1e-3
