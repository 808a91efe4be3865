"""GRPO's updates equal the reference's, update by update (float64).

The oracle transcribes the SDPO reference (lasgroup/SDPO at 0e6d510): ``verl/workers/actor/dp_actor.py``'s
``update_policy`` (mini-batches of ``ppo_mini_batch_size`` prompts × n, micro-batches of one sequence, each
loss scaled by ``1 / gradient_accumulation``, ``old_log_prob = log_prob.detach()`` when there is a single
mini-batch, the recorded ``old_log_probs`` otherwise, the gradient norm clipped to ``grad_clip``, one optimizer
step per mini-batch) with ``verl/trainer/ppo/core_algos.py``'s ``compute_policy_loss_vanilla`` and ``agg_loss``
(``token-mean``, ``clip_ratio_low/high`` 0.2 / 0.28, ``clip_ratio_c`` 3), logits divided by the rollout
temperature as its ``_forward_micro_batch`` does. Ours is one real training step of the LightningModule.
"""

import pytest
import torch

import demopsd.training.steps
from tests.fixed_step import default_tokenizer, example, one_step_with_fixed_rollouts, train_config
from tests.helpers import tiny_policy

RESPONSES = [
    "<reasoning>\nTwo is B.\n</reasoning>\n<answer>\nB\n</answer>",
    "I would say A",
    "Maybe it is C, or perhaps D, hard to tell",
    "<answer>B</answer>",
    "It is A, surely, because the question says so at length",
    "C",
    "<reasoning>\nB.\n</reasoning>\n<answer>\nB\n</answer>",
    "D, D, D",
]
REWARDS = [1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0]  # two prompts × 4 rollouts; every group has both outcomes
BATCH = [example("Which option is the number two?", "B", 0),
         example("Which option, if any, is the number two written in words?", "B", 1)]
N, TEMPERATURE, LR, WEIGHT_DECAY, CLIP = 4, 0.7, 0.05, 0.01, (0.2, 0.28, 3.0)


# ------------------------------------------------------------------------------------------------ the oracle
def compute_policy_loss_vanilla(old_log_prob, log_prob, advantages, response_mask):
    """core_algos.compute_policy_loss_vanilla with agg_loss("token-mean"): ``(pg_loss, pg_clipfrac tokens)``."""
    clip_low, clip_high, clip_ratio_c = CLIP
    negative_approx_kl = torch.clamp(log_prob - old_log_prob, min=-20.0, max=20.0)
    ratio = torch.exp(negative_approx_kl)
    pg_losses1 = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    clip_pg_losses1 = torch.maximum(pg_losses1, pg_losses2)
    clipped = torch.gt(pg_losses2, pg_losses1).float() * response_mask
    pg_losses3 = -advantages * clip_ratio_c
    clip_pg_losses2 = torch.min(pg_losses3, clip_pg_losses1)
    pg_losses = torch.where(advantages < 0, clip_pg_losses2, clip_pg_losses1)
    pg_loss = (pg_losses * response_mask).sum() / response_mask.sum()
    return pg_loss, clipped


def sequence_log_probs(policy, served, row):
    """``[R]`` log-probabilities of one unpadded sequence's response tokens at the rollout temperature."""
    prompt = served.prompt.ids[row][served.prompt.mask[row].bool()]
    response = served.response_ids[row][served.response_mask[row].bool()]
    logits = policy(input_ids=torch.cat([prompt, response])[None], use_cache=False).logits[0]
    logits = logits[len(prompt) - 1: len(prompt) - 1 + len(response)] / TEMPERATURE
    return logits.log_softmax(-1).gather(-1, response[:, None])[:, 0]


def reference_update_policy(policy, served, advantages, mini_batch_size: int):
    """dp_actor.update_policy on the served rollouts: per update, its loss and clipped/total token counts."""
    optimizer = torch.optim.AdamW(policy.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    rows = list(range(len(served.texts)))
    with torch.no_grad():  # compute_log_prob before the update
        old_log_probs = [sequence_log_probs(policy, served, row) for row in rows]
    size = mini_batch_size * N
    mini_batches = [rows[start:start + size] for start in range(0, len(rows), size)]
    on_policy = len(mini_batches) == 1
    updates = []
    for mini_batch in mini_batches:
        gradient_accumulation = len(mini_batch)  # ppo_mini_batch_size // ppo_micro_batch_size_per_gpu (1)
        optimizer.zero_grad()
        loss_total, clipped, tokens = 0.0, 0.0, 0
        for row in mini_batch:  # micro-batches of one sequence
            log_prob = sequence_log_probs(policy, served, row)
            old_log_prob = log_prob.detach() if on_policy else old_log_probs[row]
            mask = torch.ones_like(log_prob)
            pg_loss, clipped_tokens = compute_policy_loss_vanilla(
                old_log_prob, log_prob, advantages[row].expand_as(log_prob), mask
            )
            (pg_loss / gradient_accumulation).backward()
            loss_total += float(pg_loss.detach()) / gradient_accumulation
            clipped, tokens = clipped + float(clipped_tokens.sum()), tokens + len(log_prob)
        torch.nn.utils.clip_grad_norm_(policy.parameters(), max_norm=1.0)
        optimizer.step()
        updates.append((loss_total, clipped / tokens))
    return updates


# ------------------------------------------------------------------------------------------------ ours
def our_step(monkeypatch, mini_batch_size: int):
    """One training step of method=grpo, float64: the trained policy, the rollouts served, and per update the
    loss and clip fraction ``grpo_loss`` returned (one call per update: each mini-batch is one micro-batch)."""
    tokenizer = default_tokenizer()
    cfg = train_config("grpo", f"rollout.n={N}", "data.batch_size=2", f"method.mini_batch_size={mini_batch_size}",
                       f"optim.lr={LR}", f"optim.weight_decay={WEIGHT_DECAY}", "optim.warmup_steps=0",
                       "optim.grad_clip=1.0", f"rollout.temperature={TEMPERATURE}")
    policy = tiny_policy(tokenizer, seed=5).double()
    calls = []
    real_loss = demopsd.training.steps.grpo_loss

    def recorded_loss(*args, **kwargs):
        loss, stats = real_loss(*args, **kwargs)
        calls.append((float(loss.detach()), float(stats["clip_fraction"])))
        return loss, stats

    monkeypatch.setattr(demopsd.training.steps, "grpo_loss", recorded_loss)
    module, rollouts, logged = one_step_with_fixed_rollouts(monkeypatch, cfg, policy, RESPONSES, REWARDS, BATCH)
    return module.policy, rollouts.served[0], calls, logged


@pytest.mark.parametrize("mini_batch_size, updates", [(1, 2), (2, 1)])
def test_grpo_updates_equal_the_reference_loop(monkeypatch, mini_batch_size, updates):
    """Two updates of one prompt each (ratios to the recorded log-probs; the clip acts in the second), and one
    update of both prompts (today's single update, ratio 1): losses, clip fractions and parameters equal."""
    ours, served, calls, logged = our_step(monkeypatch, mini_batch_size)
    reference = tiny_policy(default_tokenizer(), seed=5).double()
    rewards = torch.tensor(REWARDS, dtype=torch.float32)
    advantages = (rewards.view(-1, N) - rewards.view(-1, N).mean(-1, keepdim=True)).view(-1)  # norm_adv_by_std off
    expected = reference_update_policy(reference, served, advantages.double(), mini_batch_size)

    assert len(calls) == len(expected) == updates
    for (loss, clip_fraction), (ref_loss, ref_clip_fraction) in zip(calls, expected):
        assert loss == pytest.approx(ref_loss, rel=1e-10, abs=1e-12)
        assert clip_fraction == pytest.approx(ref_clip_fraction, abs=1e-12)
    for (name, ours_value), ref_value in zip(ours.named_parameters(), reference.parameters()):
        torch.testing.assert_close(ours_value, ref_value, rtol=1e-9, atol=1e-11, msg=name)
    if updates == 1:
        assert expected[0][1] == 0.0  # ratio exactly 1: nothing to clip
    else:
        assert expected[0][1] == 0.0 and expected[1][1] > 0  # the second update's ratios left the clip range
        assert float(logged["grpo/clip_fraction"]) > 0
