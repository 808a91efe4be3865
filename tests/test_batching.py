"""Mini-batches and micro-batches: how a step's rollouts are cut, and that cutting them for memory never changes
the update (float64: one training step micro-batched equals the same step in one piece)."""

import dataclasses

import pytest
import torch

from demopsd.config.check import validate_config
from demopsd.data.rewards import MCQScore
from demopsd.data.types import student_conversation
from demopsd.rollout.batch import PromptBatch, RolloutBatch, encode_prompts
from demopsd.rollout.forward import response_hidden_states
from demopsd.training.batching import micro_batches, mini_batches, select_rows
from demopsd.training.run import build_module
from demopsd.training.steps import StepBatch
from tests.fixed_step import FixedRollouts, default_tokenizer, example, one_step_with_fixed_rollouts, train_config
from tests.helpers import tiny_policy

RESPONSES = [
    "<reasoning>\nTwo is B.\n</reasoning>\n<answer>\nB\n</answer>",
    "I would say A",
    "Maybe it is C, or perhaps D, hard to tell",
    "D",
    "<answer>B</answer>",
    "It is A, surely, because the question says so at length",
    "C",
    "<reasoning>\nB.\n</reasoning>\n<answer>\nB\n</answer>",
]
REWARDS = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0]
BATCH = [example("Which option is the number two?", "B", 0),
         example("Which option, if any, is the number two written in words?", "B", 1)]


# ------------------------------------------------------------------------------------------------ cutting
def test_mini_batches_are_equal_runs_of_whole_groups():
    assert mini_batches(16, 4, 2) == [range(0, 8), range(8, 16)]
    assert mini_batches(16, 4, 4) == [range(0, 4), range(4, 8), range(8, 12), range(12, 16)]
    assert mini_batches(16, 4, 1) == [range(0, 16)]
    for rows, group, updates in ((16, 4, 3), (16, 4, 8), (15, 4, 1)):
        with pytest.raises(ValueError, match="method.mini_batch_size"):
            mini_batches(rows, group, updates)


@pytest.mark.parametrize("budget", [1, 7, 12, 20, 33, 1000])
def test_micro_batches_cover_the_rows_in_order_within_the_budget(budget):
    generator = torch.Generator().manual_seed(budget)
    prompts, responses = torch.randint(1, 8, (13,), generator=generator), torch.randint(1, 9, (13,), generator=generator)
    rows = range(2, 12)
    runs = micro_batches(rows, prompts, responses, budget)
    assert [r for run in runs for r in run] == list(rows)
    for run in runs:
        padded = len(run) * (int(prompts[run.start:run.stop].max()) + int(responses[run.start:run.stop].max()))
        assert padded <= budget or len(run) == 1  # a row over the budget alone
    # greedy: no run could have taken the next run's first row
    for run, following in zip(runs, runs[1:]):
        grown = range(run.start, following.start + 1)
        width = int(prompts[grown.start:grown.stop].max()) + int(responses[grown.start:grown.stop].max())
        assert len(grown) * width > budget
    assert micro_batches(rows, prompts, responses, None) == [rows]


def test_selected_rows_give_each_row_the_states_it_has_in_the_whole_batch():
    """Cutting rows out of the padded batch, and their shared padding with them, changes no hidden state."""
    tokenizer = default_tokenizer()
    policy = tiny_policy(tokenizer).double().eval()
    generator = torch.Generator().manual_seed(0)
    prompt_lengths, response_lengths = [3, 6, 2, 5], [4, 1, 6, 2]
    prompt = PromptBatch(torch.zeros(4, 6, dtype=torch.long), torch.zeros(4, 6, dtype=torch.long))
    response_ids, response_mask = torch.zeros(4, 6, dtype=torch.long), torch.zeros(4, 6, dtype=torch.long)
    for row, (p, r) in enumerate(zip(prompt_lengths, response_lengths)):
        prompt.ids[row, 6 - p:] = torch.randint(5, 200, (p,), generator=generator)
        prompt.mask[row, 6 - p:] = 1
        response_ids[row, :r] = torch.randint(5, 200, (r,), generator=generator)
        response_mask[row, :r] = 1
    batch = RolloutBatch(prompt, response_ids, response_mask, ["a", "b", "c", "d"], 0.0, group_size=2)
    with torch.no_grad():
        whole = response_hidden_states(policy, prompt, response_ids, response_mask)
        for rows in (range(0, 1), range(1, 3), range(2, 4)):
            part = select_rows(batch, rows)
            assert part.prompt.ids.shape[1] == max(prompt_lengths[rows.start:rows.stop])  # padding removed
            assert part.response_ids.shape[1] == max(response_lengths[rows.start:rows.stop])
            states = response_hidden_states(policy, part.prompt, part.response_ids, part.response_mask)
            for i, row in enumerate(rows):
                length = response_lengths[row]
                torch.testing.assert_close(states[i, :length], whole[row, :length], rtol=0, atol=1e-12)


def test_only_the_decoders_last_output_is_kept():
    """The forward asks for no per-layer hidden states (they would all stay alive through the teacher's forward)."""
    tokenizer = default_tokenizer()
    policy = tiny_policy(tokenizer).eval()
    seen = {}
    original = policy.forward

    def forward(*args, **kwargs):
        seen.update(kwargs)
        return original(*args, **kwargs)

    policy.forward = forward
    ids = torch.tensor([[5, 6, 7]])
    states = response_hidden_states(policy, PromptBatch(ids, torch.ones_like(ids)), ids, torch.ones_like(ids))
    assert not seen.get("output_hidden_states") and seen["logits_to_keep"] == 1
    with torch.no_grad():
        expected = policy.model(input_ids=torch.cat([ids, ids], 1)).last_hidden_state[:, 2:5]
    torch.testing.assert_close(states, expected)


# ------------------------------------------------------------------------------------------------ the update
def float64_step(monkeypatch, method: str, *overrides: str):
    """One training step of ``method`` on :data:`BATCH` with fixed rollouts and rewards, in float64: the trained
    policy's parameters and the step's logged metrics."""
    tokenizer = default_tokenizer()
    cfg = train_config(method, "rollout.n=4", "data.batch_size=2", "optim.lr=1e-2", "optim.weight_decay=0.01",
                       "rollout.temperature=0.7", "method.reprompt.use_reference_answer=false"
                       if method != "grpo" else "rollout.top_p=1.0", *overrides)
    policy = tiny_policy(tokenizer, seed=3).double()
    module, _, logged = one_step_with_fixed_rollouts(monkeypatch, cfg, policy, RESPONSES, REWARDS, BATCH)
    return {k: v.detach().clone() for k, v in module.policy.named_parameters()}, logged


@pytest.mark.parametrize("method, mini_batch", [("demopsd", "null"), ("sdpo", "null"), ("sdpo", 1),
                                                 ("grpo", "null"), ("grpo", 1)])
def test_micro_batches_change_neither_the_update_nor_the_metrics(monkeypatch, method, mini_batch):
    """The same step with every rollout in its own micro-batch, in pairs, and all at once: the same parameters
    after its one or two updates (float64), the same loss, λ quantiles and clip statistics."""
    results = [float64_step(monkeypatch, method, f"memory.micro_batch_tokens={budget}",
                            f"method.mini_batch_size={mini_batch}")
               for budget in ("null", 1, 60)]
    (params, metrics), others = results[0], results[1:]
    for other_params, other_metrics in others:
        for name, value in params.items():
            torch.testing.assert_close(other_params[name], value, rtol=0, atol=1e-12)
        assert other_metrics.keys() == metrics.keys()
        for key in metrics:
            if key.startswith("perf/"):
                continue
            torch.testing.assert_close(other_metrics[key], metrics[key], rtol=0, atol=1e-12, equal_nan=True,
                                       msg=key)
    initial = dict(tiny_policy(default_tokenizer(), seed=3).double().named_parameters())
    assert any(not torch.equal(params[name], initial[name]) for name in params)  # the step did update


def test_two_updates_per_step_move_the_policy_twice(monkeypatch):
    """GRPO with a mini-batch of one prompt of two: two AdamW updates (two Adam steps in the optimizer state)."""
    captured = {}
    real = torch.optim.AdamW.step

    def counting_step(self, *args, **kwargs):
        captured["count"] = captured.get("count", 0) + 1
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", counting_step)
    _, metrics = float64_step(monkeypatch, "grpo", "method.mini_batch_size=1")
    assert captured["count"] == 2
    assert metrics["grpo/ratio_mean"] != 1.0  # the second update's ratios moved away from π_old


def test_the_teachers_prompts_are_cut_as_the_reprompt_settings_say():
    """The step encodes each teacher prompt (with its demonstration) at most ``method.reprompt.max_prompt_tokens``
    long, cut on the right as the reference's ``reprompt_truncation``."""
    tokenizer = default_tokenizer()
    settings = validate_config(train_config("sdpo", "rollout.n=4", "method.reprompt.use_reference_answer=false"))
    module = build_module(settings, tiny_policy(tokenizer), tokenizer)
    rollouts = FixedRollouts.of(tokenizer, RESPONSES[:4])
    prompts = encode_prompts(tokenizer, [student_conversation(BATCH[0])])
    batch = StepBatch(rollouts.generate(prompts, settings.rollout), [BATCH[0]] * 4,
                      [MCQScore(r, r > 0, True, "B" if r else None) for r in REWARDS[:4]], 0)
    step = module.method_step
    step.begin(batch)
    full = step.work.teacher_prompts
    assert full.ids.shape == (3, int(full.mask.sum(-1).max()))  # the three siblings of the one success
    step.reprompt = dataclasses.replace(step.reprompt, max_prompt_tokens=20)
    step.begin(batch)
    cut = step.work.teacher_prompts
    assert cut.ids.shape == (3, 20)
    first = full.ids[0][full.mask[0].bool()]
    assert torch.equal(cut.ids[0], first[:20])  # the beginning kept, the end dropped


def test_the_update_norm_is_the_size_of_the_parameters_change(monkeypatch):
    """``train/update_norm``: the global norm of θ_after − θ_before for one update, and the mean of each update's
    for two (the first update's alone is one update of the same first mini-batch)."""
    initial = dict(tiny_policy(default_tokenizer(), seed=3).double().named_parameters())
    params, metrics = float64_step(monkeypatch, "grpo", "optim.log_update_norm=true")
    change = torch.cat([(params[name] - value).flatten() for name, value in initial.items()]).norm()
    torch.testing.assert_close(metrics["train/update_norm"].double(), change, rtol=1e-6, atol=0)
    assert change > 0
    _, two_updates = float64_step(monkeypatch, "grpo", "optim.log_update_norm=true", "method.mini_batch_size=1")
    assert two_updates["train/update_norm"] > 0
    _, without = float64_step(monkeypatch, "grpo")
    assert "train/update_norm" not in without


@pytest.mark.parametrize("grad_clip", ["null", "1e-3"])
def test_an_sgd_update_is_the_learning_rate_times_the_clipped_gradient(monkeypatch, grad_clip):
    """``optim.name=sgd``: the update's norm is lr × the gradient's norm, after clipping when the clip acts
    (``train/grad_norm`` is the norm before clipping), where AdamW's first step has a size set by lr alone."""
    settings = ("optim.name=sgd", "optim.weight_decay=0", "optim.warmup_steps=0", "optim.log_update_norm=true",
                f"optim.grad_clip={grad_clip}")
    _, metrics = float64_step(monkeypatch, "grpo", *settings)
    clipped = min(float(metrics["train/grad_norm"]), float(grad_clip) if grad_clip != "null" else float("inf"))
    assert float(metrics["train/update_norm"]) == pytest.approx(1e-2 * clipped, rel=1e-6)
    assert grad_clip == "null" or float(metrics["train/grad_norm"]) > 10 * float(grad_clip)  # the clip acted
