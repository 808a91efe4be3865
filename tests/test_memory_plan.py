"""bench/memory_plan.py: the plan's categories against their closed forms, its growth with the micro-batch, the
verdicts at the card's capacity, and (slow) the plan against the same step measured on a CPU."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from bench.memory_plan import Card, Engine, Workload, measure, plan, qwen3

FP32 = 4


def tiny(world_size: int = 2, rows: int = 1) -> Workload:
    return Workload("tiny", world_size, rows=rows, prompt_tokens=32, response_tokens=64, teacher_prompt_tokens=48)


@pytest.fixture(scope="module")
def tiny_sizes() -> tuple[int, int, int]:
    """The tiny architecture's parameters, parameter tensors and bytes of buffers (rotary frequencies)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(qwen3("tiny"))
    parameters = list(model.parameters())
    return sum(p.numel() for p in parameters), len(parameters), sum(b.nbytes for b in model.buffers())


@pytest.mark.parametrize("world_size", [2, 4])
def test_weights_gradients_and_adamw_state_are_their_closed_forms(world_size, tiny_sizes):
    parameters, tensors, buffers = tiny_sizes
    shard = parameters * FP32 // world_size
    result = plan(tiny(world_size))

    assert result.peak["sharded params"] == shard + buffers
    assert result.between_steps["teacher"] == shard + buffers  # the EMA copy, fp32, sharded the same way
    assert result.peak["teacher"] > shard  # plus what its forward gathers and computes
    # AdamW: two fp32 moments per parameter, and a 0-dim fp32 step counter per parameter tensor
    assert result.between_steps["optimizer"] == 2 * shard + FP32 * tensors
    assert result.peak["optimizer"] >= 2 * shard + FP32 * tensors
    # the micro-batch accumulates into the earlier ones' gradients; zero_grad frees them after the update
    assert result.peak["gradients"] >= shard
    assert result.between_steps["gradients"] == 0
    assert result.between_steps["gathered params"] == 0  # every unit resharded


def test_the_peak_grows_with_the_micro_batchs_tokens():
    one, four = plan(tiny(rows=1)), plan(tiny(rows=4))

    assert four.peak_bytes > one.peak_bytes
    assert four.peak["activations"] + four.peak["temporary"] > one.peak["activations"] + one.peak["temporary"]
    # between steps only the batch's own token ids and masks (int64) depend on its rows
    row_inputs = 2 * (32 + 48 + 64) * 8
    assert four.between_steps_bytes - one.between_steps_bytes == 3 * row_inputs


CAPACITY, ENGINE_SHARE, RESERVE, FRAGMENTATION, ASLEEP = 1000, 0.25, 50, 0.25, 0  # exact in binary: no rounding
WEIGHTS, OVERHEAD = 100, 20  # KV cache: 250 - 100 - 20 = 130 bytes


def card(utilization: float = ENGINE_SHARE, asleep: float = ASLEEP) -> Card:
    return Card("test", CAPACITY, utilization, RESERVE, FRAGMENTATION, asleep)


def test_without_sleep_the_step_fits_up_to_the_card_less_the_engine():
    # 560 · 1.25 + 50 + 250 = 1000
    assert card().verdict(560, 100, False, WEIGHTS, OVERHEAD, sequence=100) == "fits"
    assert card().verdict(561, 100, False, WEIGHTS, OVERHEAD, sequence=100) == "does not fit"
    assert card().verdict(561, 100, True, WEIGHTS, OVERHEAD, sequence=100) == "fits"  # the engine asleep


def test_with_sleep_the_peak_has_the_whole_card_and_the_state_between_steps_shares_it_with_the_engine():
    # training asleep: 760 · 1.25 + 50 = 1000; generating: 560 · 1.25 + 50 + 250 = 1000
    assert card().verdict(760, 560, True, WEIGHTS, OVERHEAD, sequence=100) == "fits"
    assert card().verdict(761, 100, True, WEIGHTS, OVERHEAD, sequence=100) == "does not fit"
    assert card().verdict(760, 561, True, WEIGHTS, OVERHEAD, sequence=100) == "does not fit"
    # what the engine keeps asleep comes off the trainer's room: 600 · 1.25 + 50 + 200 = 1000
    assert card(asleep=200).verdict(600, 100, True, WEIGHTS, OVERHEAD, sequence=100) == "fits"
    assert card(asleep=200).verdict(601, 100, True, WEIGHTS, OVERHEAD, sequence=100) == "does not fit"


def test_an_evaluation_holds_the_gathered_policy_beside_the_awake_engine():
    # evaluating: (460 + 100 gathered) · 1.25 + 50 + 250 = 1000, while training asleep and generating fit easily
    assert card().verdict(600, 460, True, WEIGHTS, OVERHEAD, sequence=100, gathered=100) == "fits"
    assert card().verdict(600, 461, True, WEIGHTS, OVERHEAD, sequence=100, gathered=100) == "does not fit"
    assert card().verdict(600, 461, True, WEIGHTS, OVERHEAD, sequence=100) == "fits"  # no evaluation


def test_the_engine_needs_room_for_one_whole_sequence():
    assert card().verdict(100, 100, True, WEIGHTS, OVERHEAD, sequence=130) == "fits"
    assert card().verdict(100, 100, True, WEIGHTS, OVERHEAD, sequence=131) == "does not fit"


def test_the_highest_utilization_is_the_last_multiple_of_a_twentieth_that_fits():
    trainer = 400  # 400 · 1.25 + 50 = 550: 450 bytes left, 0.45 of the card
    highest = card().highest_utilization(trainer)

    assert highest == pytest.approx(0.45)
    assert card(highest).generating(trainer) <= CAPACITY < card(highest + 0.05).generating(trainer)


def test_the_utilization_for_every_rollout_holds_them_all():
    engine = Engine(weights=WEIGHTS, overhead=OVERHEAD, sequence=30, rollouts=10)  # 420 bytes: 0.42 → 0.45
    utilization = engine.utilization_for_all(CAPACITY)

    assert utilization == pytest.approx(0.45)
    assert engine.sequences(card(utilization)) >= 10 > engine.sequences(card(utilization - 0.05))


@pytest.mark.slow
def test_the_plan_is_the_measured_peak_of_the_same_step_on_a_cpu_process():
    """One process: no collective, whose buffers gloo frees when its threads get to it (bench/README.md)."""
    workload = Workload("tiny", 1, rows=2, prompt_tokens=64, response_tokens=512, teacher_prompt_tokens=64)
    measured = measure(workload)
    planned = plan(workload)

    assert planned.peak_phase == measured["peak_phase"] == "backward"
    assert planned.peak_bytes == measured["tracker"]  # fake tensors and real ones: the same allocations
    assert planned.peak_bytes <= measured["allocator"] <= planned.peak_bytes * 1.001  # the CPU allocator's own count
