"""The planner under expert parallelism: per-GPU memory with a share of the routed experts, the all-to-all in
the step time, and the layout it names when a model does not fit one GPU."""

from __future__ import annotations

from moefit.plan import plan


def test_maverick_names_the_gpus_and_layout_on_which_it_fits():
    one = plan(model="llama4-maverick", gpus=["h100-80gb"], search=False)
    assert not one.fits
    assert "expert parallelism: 4x H100 80GB SXM with parallel.expert 4 (--expert-parallel 4 --num-gpus 4)" \
        in one.suggestion
    four = plan(model="llama4-maverick", gpus=["h100-80gb"], expert_parallel=4, search=False)
    assert four.fits and four.cfg.plan.num_gpus == 4


def test_expert_parallelism_splits_the_routed_experts_and_their_lora():
    one = plan(model="llama4-maverick", gpus=["h200"], search=False).memory.by_key()
    two_plan = plan(model="llama4-maverick", gpus=["h200"], expert_parallel=2, search=False)
    two = two_plan.memory.by_key()
    assert abs(two["weights_routed_experts"] - one["weights_routed_experts"] / 2) < 2**20
    assert two["weights_attention"] == one["weights_attention"]
    assert two["lora_params"] < one["lora_params"]
    step = two_plan.gpus[0].step
    assert step.alltoall_s > 0 and two_plan.to_dict()["gpus"][0]["extrapolated"]
    assert "expert parallel: each MoE layer's 128 routed experts split over 2 GPUs" in two_plan.render()


def test_the_number_of_gpus_must_hold_whole_expert_groups():
    import pytest

    from moefit.errors import ConfigError

    with pytest.raises(ConfigError, match="not a multiple of parallel.expert"):
        plan(model="llama4-maverick", gpus=["h200"], expert_parallel=4, num_gpus=6)
