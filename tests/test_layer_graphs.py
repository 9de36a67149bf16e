"""engine.layer_graphs: each checkpointed layer's first pass replayed, its recomputation backpropagated.

On CPU the graph is stood in for by the same first pass run eagerly (LayerGraphs(stand_in=True)): the static
inputs, shared arguments, random-number states, kept tensors and the recomputation's backward are the code the GPU
runs, and must give torch's checkpoint's gradients bit for bit. The capture itself is checked on the GPU
(tests/test_gpu.py)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from moefit import engine_switches
from moefit.bench import build_synthetic_model
from moefit.config import LoraConfig
from moefit.models.layer_graphs import LayerGraphs
from tests.test_engine_parity import CONFIGS, tiny_config


def _model(folder, config: str, keep: bool, graphs: bool, backward: bool = False):
    tiny_config(**CONFIGS[config]).save_pretrained(folder)
    return built(folder, keep, graphs, backward)


def built(folder, keep: bool, graphs: bool, backward: bool = False):
    """The tiny model of the config in `folder`, NF4, LoRA with dropout, checkpointed, in training mode; with
    `graphs` its first passes stood in for graph replays (with `backward`, their recomputations and backwards too)."""
    model = build_synthetic_model(str(folder), device="cpu", dtype=torch.float32,
                                  lora=LoraConfig(r=4, alpha=8, dropout=0.1), seed=3)
    model.enable_gradient_checkpointing(keep_routed_gate_up=keep)
    if graphs:
        model.use_layer_graphs(LayerGraphs(stand_in=True, backward=backward))
    model.train()
    return model


def _batches():
    gen = torch.Generator().manual_seed(0)
    ids = [torch.randint(3, 256, (2, 24), generator=gen) for _ in range(3)]
    packed = torch.cat([torch.arange(10), torch.arange(14)]).repeat(2, 1)  # two samples per row
    return [(ids[0], None), (ids[1], packed), (ids[2], None)]


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def same_as_torch_checkpoint(folder, config: str, keep: bool, batches: list, backward: bool = False):
    """The batches' micro-steps (LoRA dropout on) with and without the graphs stood in: the same losses and
    accumulated LoRA gradients bit for bit, every LoRA B with a gradient. Returns the graphs' LayerGraphs."""
    results = {}
    for graphs in (False, True):
        model = _model(folder / str(graphs), config, keep, graphs, backward)
        losses = []
        for i, (ids, positions) in enumerate(batches):
            torch.manual_seed(100 + i)
            out = model(ids, labels=ids, position_ids=positions)
            out.loss.backward()
            losses.append(out.loss.detach())
        results[graphs] = (losses, _grads(model), model.layer_graphs)
    (plain_losses, plain_grads, _), (losses, grads, layer_graphs) = results[False], results[True]
    assert all(torch.equal(a, b) for a, b in zip(plain_losses, losses, strict=True))
    assert grads.keys() == plain_grads.keys() and len(grads) > 10
    assert all(grads[k].abs().sum() > 0 for k in grads if k.endswith("lora_B"))  # (a test of zeros proves nothing)
    assert all(torch.equal(grads[k], plain_grads[k]) for k in grads), \
        [k for k in grads if not torch.equal(grads[k], plain_grads[k])]
    return layer_graphs


@pytest.mark.parametrize("config,keep,skip", [("top1-4e-norope", False, True), ("top1-4e-norope", True, True),
                                              ("top2-8e-norope", True, True), ("top1-4e-norope", False, False)])
def test_replayed_first_pass_gives_torch_checkpoints_gradients(tmp_path, monkeypatch, config, keep, skip):
    """Three micro-steps (one with packed rows, i.e. other masks), LoRA dropout on: the same losses and the same
    accumulated LoRA gradients, bit for bit, as torch's checkpoint."""
    monkeypatch.setattr(engine_switches, "_current",
                        dataclasses.replace(engine_switches.current(), recompute_skip=skip))
    stats = same_as_torch_checkpoint(tmp_path, config, keep, _batches()).stats()
    # 3 layers x 3 micro-steps replayed; packed and unpacked rows build other masks: two captures per layer
    assert stats["replayed"] == 9 and stats["graphs"] == 6 and not stats["eager"] and stats["disabled"] is None


@pytest.mark.parametrize("config,keep", [("top1-4e-norope", False), ("top2-8e-norope", True)])
def test_replayed_backward_gives_torch_checkpoints_gradients(tmp_path, config, keep):
    """engine.backward_graphs: from a layer's second backward on, its recomputation and backward replay (stood in
    on CPU) into shared buffers, and the LoRA gradients are accumulated after each: five micro-steps, LoRA dropout
    on, one batch of packed rows (two captures per layer), the losses and accumulated gradients of torch's
    checkpoint bit for bit. The first layer needs no input gradient; the others hand theirs on in one buffer."""
    gen = torch.Generator().manual_seed(1)
    packed = torch.cat([torch.arange(10), torch.arange(14)]).repeat(2, 1)
    batches = [(torch.randint(3, 256, (2, 24), generator=gen), packed if i == 2 else None) for i in range(5)]
    stats = same_as_torch_checkpoint(tmp_path, config, keep, batches, backward=True).stats()
    # 3 layers x 5 micro-steps; the first backward of each of the 6 graphs eager (then captured), 9 replayed
    assert stats["replayed"] == 15 and stats["graphs"] == 6 and not stats["eager"]
    assert stats["backward"] == {"replayed": 9, "eager": {}, "disabled": None}


def train_three_steps(model, ids: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Three AdamW steps of two micro-steps each (`ids`: six batches), gradients set to None between steps; the
    trained LoRA weights."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    for step in range(3):
        for micro in range(2):
            torch.manual_seed(10 * step + micro)
            (model(ids[2 * step + micro], labels=ids[2 * step + micro]).loss / 2).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_replayed_backward_across_optimizer_steps_trains_as_torch_checkpoint(tmp_path):
    """Three AdamW steps of two micro-steps each, gradients set to None between steps (the first replayed backward
    of a step takes its gradients, the second adds): the LoRA weights after training equal torch's checkpoint's
    bit for bit, so the replays read each step's updated weights."""
    gen = torch.Generator().manual_seed(2)
    ids = [torch.randint(3, 256, (2, 24), generator=gen) for _ in range(6)]
    trained = {}
    for graphs in (False, True):
        model = _model(tmp_path / str(graphs), "top1-4e-norope", False, graphs, backward=True)
        trained[graphs] = (train_three_steps(model, ids), model.layer_graphs)
    (plain, _), (replayed, layer_graphs) = trained[False], trained[True]
    assert all(torch.equal(plain[k], replayed[k]) for k in plain), [k for k in plain
                                                                    if not torch.equal(plain[k], replayed[k])]
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in replayed.items() if k.endswith("lora_B"))
    assert layer_graphs.stats()["backward"]["replayed"] == 15  # 3 layers x 6 micro-steps, the first eager


def test_a_parameter_the_layer_does_not_use_keeps_no_gradient(tmp_path):
    """A replayed backward accumulates only the gradients autograd would have given: a LoRA weight the layer's
    output does not depend on keeps None (zeros would let weight decay and momentum move it)."""
    model = _model(tmp_path, "top1-4e-norope", False, True, backward=True)
    layer = model.hf.model.layers[1]
    unused = torch.nn.Parameter(torch.ones(3))
    layer.register_parameter("unused_lora", unused)
    ids = _batches()[0][0]
    for i in range(3):
        torch.manual_seed(i)
        model(ids, labels=ids).loss.backward()
    assert unused.grad is None and model.layer_graphs.stats()["backward"]["replayed"] == 6


def test_packed_and_single_sample_rows_replay_one_graph_per_layer(tmp_path):
    """The trainer's batches carry position ids: with the graphs replaying, rows of one sample get their masks
    built the packed way too (host_positions.as_packed; the same masks), so packed and unpacked batches share one
    graph per layer, and the gradients are those of the masks built the usual way."""
    gen = torch.Generator().manual_seed(0)
    ids = [torch.randint(3, 256, (2, 24), generator=gen) for _ in range(3)]
    packed = torch.cat([torch.arange(10), torch.arange(14)]).repeat(2, 1)
    whole = torch.arange(24).repeat(2, 1)
    results = {}
    for graphs in (False, True):
        model = _model(tmp_path / str(graphs), "top1-4e-norope", False, graphs)
        for i, positions in enumerate([whole, packed, whole]):
            torch.manual_seed(100 + i)
            model(ids[i], labels=ids[i], position_ids=positions).loss.backward()
        results[graphs] = (_grads(model), model.layer_graphs.stats())
    (plain, _), (grads, stats) = results[False], results[True]
    assert stats["graphs"] == 3 and stats["replayed"] == 9 and not stats["eager"]
    assert all(torch.allclose(grads[k], plain[k], rtol=1e-4, atol=1e-7) for k in plain)
    # the trainer turns it off where no row is packed (data.dataset.any_packed): then two kinds, two graphs
    model = _model(tmp_path / "causal", "top1-4e-norope", False, True)
    model.layer_graphs.masks_as_packed = False
    for i, positions in enumerate([whole, packed]):
        model(ids[i], labels=ids[i], position_ids=positions).loss.backward()
    assert model.layer_graphs.stats()["graphs"] == 6


def test_any_packed_tells_when_the_trainer_may_keep_the_causal_masks():
    from moefit.data.dataset import any_packed

    whole = {"input_ids": [5] * 8, "labels": [5] * 8, "position_ids": list(range(8))}
    two = {"input_ids": [5] * 8, "labels": [5] * 8, "position_ids": list(range(3)) + list(range(5))}
    short = {"input_ids": [5] * 6, "labels": [5] * 6, "position_ids": list(range(6))}
    assert not any_packed([whole, whole], 8)
    assert any_packed([whole, two], 8) and any_packed([whole, short], 8)  # (short: padded to 8, a second sample)


def test_a_second_forward_before_backward_runs_eagerly(tmp_path):
    """Three forwards, then their three backwards: the second and third cannot overwrite what the first's
    backward will read, so they run through torch's checkpoint; the gradients are still torch's. A forward whose
    graph was dropped without a backward does not hold the next one back."""
    results = {}
    for graphs in (False, True):
        model = _model(tmp_path / str(graphs), "top1-4e-norope", True, graphs)
        (a, _), (b, _), (c, _) = _batches()
        torch.manual_seed(7)
        first = model(a, labels=a).loss
        torch.manual_seed(8)
        second = model(b, labels=b).loss
        torch.manual_seed(6)
        third = model(c, labels=c).loss
        second.backward()
        third.backward()
        first.backward()
        model(a, labels=a)  # dropped, never backpropagated
        torch.manual_seed(9)
        model(b, labels=b).loss.backward()
        results[graphs] = (_grads(model), model.layer_graphs)
    grads, plain = results[True][0], results[False][0]
    assert all(torch.equal(grads[k], plain[k]) for k in plain)
    stats = results[True][1].stats()
    assert stats["eager"] == {"forward before backward": 6} and stats["replayed"] == 9


def test_each_measurement_replays_with_graphs_of_its_own(tmp_path):
    """moefit bench and plan_validation measure several shapes on one model: each measurement gets fresh graphs,
    as a run of one shape would (the earlier shapes' graphs would hold memory and, past MAX_SHAPES_PER_LAYER,
    send the later shapes' first passes to torch's checkpoint), and reports what replayed."""
    from moefit.bench import measure_training
    from moefit.models.layer_graphs import MAX_SHAPES_PER_LAYER

    model = _model(tmp_path, "top1-4e-norope", False, True)
    for seq_len in range(8, 8 + 4 * (MAX_SHAPES_PER_LAYER + 1), 4):
        before = model.layer_graphs
        r = measure_training(model, seq_len=seq_len, batch=1, steps=1, warmup=0, optimizer="adamw")
        assert r["layer_graphs"] == {"graphs": 3, "replayed": 3, "eager": {}, "disabled": None}, seq_len
        assert model.layer_graphs.stand_in and (model.layer_graphs is not before) == (seq_len > 8)


def test_on_from_the_engine_setting_and_eager_off_the_gpu(tmp_path, monkeypatch):
    model = _model(tmp_path / "on", "top1-4e-norope", False, False)
    assert model.layer_graphs is not None and not model.layer_graphs.stand_in  # the default
    ids = _batches()[0][0]
    model(ids, labels=ids).loss.backward()  # on CPU no graph can stand in: torch's checkpoint, counted
    assert model.layer_graphs.stats()["eager"] == {"not on a GPU": 3}
    monkeypatch.setattr(engine_switches, "_current",
                        dataclasses.replace(engine_switches.current(), layer_graphs=False))
    assert _model(tmp_path / "off", "top1-4e-norope", False, False).layer_graphs is None


def test_padding_to_one_shape_leaves_the_loss_and_gradients_of_the_real_tokens(tmp_path):
    """The trainer pads every packed micro-batch to train.max_length for the graphs (data.dataset.collate's
    pad_to): the padding is a sample of its own (restarting positions) with no labels, so the loss and the LoRA
    gradients of the real tokens stay those of the unpadded batch."""
    from moefit.data.dataset import collate, padding_fraction

    gen = torch.Generator().manual_seed(0)
    rows = [{"input_ids": ids, "labels": ids, "position_ids": list(range(10)) + list(range(n - 10))}
            for n in (20, 17) for ids in [torch.randint(3, 256, (n,), generator=gen).tolist()]]
    assert padding_fraction(rows, 24) == pytest.approx(1 - 37 / 48)
    results = []
    for pad_to in (None, 24):
        model = _model(tmp_path / str(pad_to), "top1-4e-norope", False, False)
        model.eval()  # no dropout: the two batches draw different masks
        batch = collate(rows, 0, pad_to)
        assert batch["input_ids"].shape == (2, 24 if pad_to else 20)
        out = model(**batch)
        out.loss_sum.backward()
        results.append((out.loss_sum.detach(), out.num_tokens, _grads(model)))
    (loss, n, grads), (padded_loss, padded_n, padded_grads) = results
    assert n == padded_n and torch.allclose(loss, padded_loss, rtol=1e-5)
    assert all(torch.allclose(grads[k], padded_grads[k], rtol=1e-4, atol=1e-7) for k in grads)


def test_the_trainer_pads_to_one_shape_only_where_the_graphs_replay():
    from moefit.config import RunConfig
    from moefit.train.loop import graph_pad_length

    cfg = RunConfig()
    cfg.train.gradient_checkpointing, cfg.train.max_length = True, 1024
    cuda = torch.device("cuda", 0)
    assert graph_pad_length(cfg, cuda) == 1024
    assert graph_pad_length(cfg, torch.device("cpu")) is None
    cfg.parallel.expert = 2  # expert-parallel layers run eagerly
    assert graph_pad_length(cfg, cuda) is None
    cfg.parallel.expert, cfg.data.packing = 1, False  # unpacked rows vary in length: padding would cost more
    assert graph_pad_length(cfg, cuda) is None

    def rows(*lengths):
        return [{"input_ids": [1] * n} for n in lengths]

    assert graph_pad_length(cfg, cuda, rows(1000, 980, 1024)) == 1024  # nearly all full: padded, one shape
    assert graph_pad_length(cfg, cuda, rows(1000, 300, 1024)) is None  # 42 % padding: no graphs instead
    cfg.data.packing, cfg.engine.layer_graphs = True, False
    assert graph_pad_length(cfg, cuda) is None


def test_unpacked_rows_of_many_lengths_run_without_the_graphs_and_say_so(tmp_path, monkeypatch):
    """`data.packing: false` with rows of many lengths: each shape would capture graphs of its own (memory the
    plan does not count) and the rest run eagerly; the trainer turns the graphs off for the run and says why. (On
    CPU the decision is taken as on a GPU: graphs_replay is made to say yes.)"""
    import moefit.train.loop as loop
    from moefit.assets import tiny_model_dir
    from moefit.train import train
    from tests.test_train import small

    monkeypatch.setattr(loop, "graphs_replay", lambda cfg, device: True)
    settings = small(tiny_model_dir(), **{"train.max_steps": 1, "train.gradient_checkpointing": True,
                                          "train.eval_every": 100, "data.packing": False})
    train(output_dir=tmp_path / "run", echo=False, **settings)
    logged = "\n".join(p.read_text() for p in (tmp_path / "run").glob("*.log"))
    assert "engine.layer_graphs off for this run: unpacked rows of many lengths" in logged
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["layer_graphs"]["disabled"].startswith("unpacked rows of many lengths")
    assert report["layer_graphs"]["replayed"] == 0


def test_the_trainer_installs_the_graphs_and_reports_them(tmp_path):
    """Through `moefit train`'s path with checkpointing: on CPU every first pass runs through torch's checkpoint,
    counted as such in report.json."""
    from moefit.assets import tiny_model_dir
    from moefit.train import train
    from tests.test_train import small

    settings = small(tiny_model_dir(), **{"train.max_steps": 2, "train.gradient_checkpointing": True,
                                          "train.eval_every": 100})
    train(output_dir=tmp_path / "run", echo=False, **settings)
    graphs = json.loads((tmp_path / "run" / "report.json").read_text())["layer_graphs"]
    assert graphs["replayed"] == 0 and graphs["eager"].get("not on a GPU", 0) > 0 and graphs["disabled"] is None


def test_a_run_that_fits_only_with_less_on_the_gpu_runs_so():
    """Scout at seq 11008 on an H100 80GB: the graphs' memory grows with the tokens and tips it over; the trainer's
    check turns engine.layer_graphs off instead of refusing. At seq 16384 that is not enough: with train.layout auto
    the layers' saved inputs go to host memory (the same gradient); as written the refusal stands. Where nothing
    fits, the refusal stands and the settings are left as they were."""
    from moefit.config import load_config
    from moefit.plan import plan
    from moefit.train.loop import describe_lean_changes, fit_check_lean_if_needed

    cfg = load_config("recipes/llama4-scout-qlora.yaml")
    cfg.train.max_length = 11008
    h100 = int(79.65 * 2**30)
    assert not plan(cfg, gpus=["h100-80gb"], search=False).gpus[0].fits  # as written, with the graphs
    fitted, msg, lean = fit_check_lean_if_needed(cfg, "NVIDIA H100 80GB HBM3", h100)
    assert msg is None and lean == {"engine.backward_graphs": False, "engine.layer_graphs": False} and fitted.fits
    assert cfg.engine.layer_graphs is False and cfg.engine.backward_graphs is False
    assert "layer_graph_pool" not in fitted.memory.by_key() and not cfg.train.offload_checkpoints
    assert "engine.backward_graphs and engine.layer_graphs off" in describe_lean_changes(lean)

    cfg = load_config("recipes/llama4-scout-qlora.yaml")
    cfg.train.max_length = 16384
    _, msg, lean = fit_check_lean_if_needed(cfg, "NVIDIA H100 80GB HBM3", h100, offload=False)
    assert msg is not None and not lean and cfg.engine.layer_graphs and not cfg.train.offload_checkpoints
    fitted, msg, lean = fit_check_lean_if_needed(cfg, "NVIDIA H100 80GB HBM3", h100)
    assert msg is None and fitted.fits and lean["train.offload_checkpoints"] is True
    assert cfg.train.offload_checkpoints and "train.offload_checkpoints on" in describe_lean_changes(lean)

    cfg = load_config("recipes/llama4-scout-qlora.yaml")
    cfg.train.max_length = 65536
    _, msg, lean = fit_check_lean_if_needed(cfg, "NVIDIA H100 80GB HBM3", h100)
    assert msg is not None and not lean and cfg.engine.layer_graphs is True and cfg.engine.backward_graphs is True
    assert cfg.train.offload_checkpoints is False


def test_data_parallel_keeps_the_graphs_and_torch_checkpoints_gradients(tmp_path):
    """Two processes (torchrun, gloo), data parallelism as the trainer wraps it, an accumulation step without the
    sync and one with it: the summed LoRA gradients of the replayed first passes, recomputations and backwards
    (stood in on CPU), and those with the layers' saved inputs offloaded (train.offload_checkpoints), are torch's
    checkpoint's bit for bit and equal on the ranks (tests/graphs_dp_worker.py checks them on each rank)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    tiny_config(**CONFIGS["top1-4e-norope"]).save_pretrained(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(repo / "tests" / "graphs_dp_worker.py"), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and (tmp_path / "ok").is_file(), proc.stderr[-3000:]
