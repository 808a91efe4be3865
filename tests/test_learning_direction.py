"""One optimizer step of every method moves the policy the right way (not up the objective, not nowhere).

Each test runs one real ``SelfDistillationModule`` step in a real ``lightning.Trainer`` (see
``tests/fixed_step.py``) on a fixed batch: one prompt, four fixed responses of different lengths, rewards
``[1, 0, 0, 0]``. Then, with plain forwards of the policy before and after the step:

- demopsd, sdpo, opsd: the objective toward the target of *before* the step (the teacher's logits recorded
  in the step, held fixed, since the EMA / live teacher moves with the step; for DemoPSD the barycenter of
  that teacher and the pre-step student, which is a fixed distribution over tokens when ``top_k=null``) falls
  by at least 2% (it falls 4-15% with AdamW at lr 1e-3; float noise is ~1e-7). The measure is first checked
  to equal the loss the module computed.
- grpo: the summed log-probability of the rewarded response (positive advantage) rises and that of each
  unrewarded sibling (negative advantage) falls.
"""

from dataclasses import replace

import pytest
import torch

from demopsd.objectives import barycenter_log_probs, distillation_loss, token_losses
from tests.fixed_step import LossCalls, example, response_outputs, setup_step, unpadded

RESPONSES = [
    "<reasoning>\nTwo is B.\n</reasoning>\n<answer>\nB\n</answer>",
    "I would say A",
    "Maybe it is C, or perhaps D, hard to tell",
    "D",
]
REWARDS = [1.0, 0.0, 0.0, 0.0]  # the first succeeds: its siblings get it as a demonstration; GRPO raises it
BATCH = [example("Which option is the number two?", "B")]
# AdamW's first step moves every weight by about lr whatever its gradient: 1e-3 is well inside the region where
# the objective falls (at 1e-2 the step overshoots and even the fixed-target loss rises on this tiny model).
SETTINGS = ["rollout.n=4", "rollout.temperature=1.0", "optim.lr=1e-3", "optim.warmup_steps=0"]
METHOD_SETTINGS = {
    # DemoPSD's target is a barycenter with the student; on the full vocabulary it can be held fixed. A blend
    # temperature of 1 puts λ near 0.5 on these sharp distributions (0.1 gives λ ≈ 0: target ≈ student,
    # loss ≈ 0).
    "demopsd": ["method.objective.top_k=null", "method.objective.temperature=1.0",
                "method.reprompt.use_reference_answer=false"],
    "sdpo": ["method.reprompt.use_reference_answer=false"],
    "opsd": [],
    "grpo": [],
}


def student_logits(model, served) -> torch.Tensor:
    """``[N, V]`` logits at every response token of the served batch, rows in order (as ``mask.bool()`` picks)."""
    with torch.no_grad():
        return torch.cat([response_outputs(model, *unpadded(served, row))[1] for row in range(len(served.texts))])


def response_log_probs(model, served) -> torch.Tensor:
    """``[B]`` summed log-probability of each served response under ``model``."""
    with torch.no_grad():
        sums = []
        for row in range(len(served.texts)):
            prompt, response = unpadded(served, row)
            logits = response_outputs(model, prompt, response)[1]
            sums.append(logits.log_softmax(-1).gather(-1, response[:, None]).sum())
        return torch.stack(sums)


def fixed_target_objective(call: dict, logits_before: torch.Tensor):
    """The recorded step's objective as a function of the student's logits, its target frozen before the step."""
    config, kwargs = call["config"], {k: v for k, v in call["kwargs"].items() if k != "chunk_size"}
    target = call["teacher_hidden"] @ call["teacher_head"].T  # the teacher's logits of the step
    if not config.target_is_teacher:
        assert config.top_k is None, "a top-k barycenter lives on the student's moving support"
        _, stats = token_losses(logits_before, target, call["tokens"], config, **kwargs)
        lam = stats["lambda"][call["token_weights"] > 0].mean()
        assert 0.2 < lam < 0.8, f"mean λ={lam:.3f}: the target should be neither the teacher nor the student"
        target = barycenter_log_probs(target.log_softmax(-1), logits_before.log_softmax(-1), stats["lambda"])
        config, kwargs = replace(config, blend="constant", lambda_max=1.0), {**kwargs, "lambda_max": 1.0}

    def objective(logits: torch.Tensor) -> float:
        return float(distillation_loss(logits, target, call["tokens"], call["token_weights"], config, **kwargs)[0])

    return objective


@pytest.mark.parametrize("method", ["demopsd", "sdpo", "opsd"])
def test_distillation_step_lowers_the_loss_toward_the_pre_step_target(method, monkeypatch):
    step = setup_step(monkeypatch, method, RESPONSES, REWARDS, *SETTINGS, *METHOD_SETTINGS[method])
    losses = LossCalls(monkeypatch)

    step.fit(BATCH)

    (call,) = losses.calls
    served = step.rollouts.served[0]
    assert (call["token_weights"] > 0).sum() >= 10, "too few distilled tokens for a meaningful step"
    before = student_logits(step.initial, served)
    objective = fixed_target_objective(call, before)
    loss_before, loss_after = objective(before), objective(student_logits(step.module.policy, served))
    assert loss_before == pytest.approx(float(call["loss"]), rel=1e-4, abs=1e-7), "not the objective the step took"
    assert loss_after < 0.98 * loss_before, f"{method}: the fixed-target loss went from {loss_before} to {loss_after}"


def test_grpo_step_raises_the_rewarded_response_and_lowers_the_unrewarded_ones(monkeypatch):
    step = setup_step(monkeypatch, "grpo", RESPONSES, REWARDS, *SETTINGS, *METHOD_SETTINGS["grpo"])

    trainer = step.fit(BATCH)
    assert float(trainer.logged_metrics["grpo/varied_group_fraction"]) == 1.0  # its one group has mixed rewards

    served = step.rollouts.served[0]
    change = response_log_probs(step.module.policy, served) - response_log_probs(step.initial, served)
    assert change[0] > 0.25, f"the rewarded response's log-probability changed by {change[0]:.3f}"
    assert (change[1:] < -0.25).all(), f"the unrewarded responses' log-probabilities changed by {change[1:].tolist()}"
