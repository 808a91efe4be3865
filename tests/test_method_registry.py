"""A new kind of method is its objective's settings, its step and its YAML: registered here, a toy method
(reward-weighted likelihood) is checked, built, trained and reported by the project's own code, untouched."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file

from demopsd.config.check import ConfigError, validate_config
from demopsd.config.methods import METHODS, MethodConfig, register_method
from demopsd.config.settings import check_rules
from demopsd.objectives.chunked import chunked_token_log_probs
from demopsd.rollout.forward import lm_head_weight, response_hidden_states
from demopsd.training.batching import select_rows
from demopsd.training.steps import StepBatch, tempered
from tests.helpers import CONFIG_DIR
from tests.test_train_smoke import alternating_reward  # noqa: F401 - a fixture: rewards 1, 0, 1, 0 ...


@dataclass(frozen=True)
class RewardWeightedObjective:
    """``method.objective`` of the toy method: the loss is ``-scale · reward · log π(token)``, averaged over the
    mini-batch's response tokens."""

    SECTION: ClassVar[str] = "method.objective"
    scale: float = 1.0

    def __post_init__(self) -> None:
        check_rules(self.SECTION, (self.scale > 0, "scale", self.scale, "a positive scale"))


@dataclass(frozen=True)
class RewardWeightedMethod(MethodConfig):
    KIND: ClassVar[str] = "reward_weighted"
    kind: str = "reward_weighted"
    objective: RewardWeightedObjective = field(default_factory=RewardWeightedObjective)


class RewardWeightedStep:
    """The toy method's step: likelihood of each rollout weighted by its reward (rejection-sampling fine-tuning)."""

    teacher = None
    progress_bar: dict[str, str] = {}

    @classmethod
    def from_settings(cls, policy, tokenizer, settings) -> RewardWeightedStep:
        return cls(policy, settings.method.objective.scale, settings.rollout.temperature)

    def __init__(self, policy, scale: float, temperature: float) -> None:
        self.policy, self.scale, self.temperature = policy, scale, temperature
        self.batch: StepBatch | None = None
        self.losses: list[torch.Tensor] = []

    def begin(self, batch: StepBatch) -> None:
        self.batch, self.losses = batch, []

    def micro_batch_loss(self, mini_batch: range, micro_batch: range, clock) -> torch.Tensor:
        part = select_rows(self.batch.rollouts, micro_batch)
        with clock.phase("student_forward"):
            hidden = response_hidden_states(self.policy, part.prompt, part.response_ids, part.response_mask)
        valid = part.response_mask.bool()
        log_probs, _ = chunked_token_log_probs(
            tempered(hidden[valid], self.temperature), lm_head_weight(self.policy), part.response_ids[valid]
        )
        rewards = torch.tensor([self.batch.scores[r].reward for r in micro_batch], dtype=log_probs.dtype)
        mini_batch_tokens = self.batch.rollouts.response_mask[mini_batch.start:mini_batch.stop].sum()
        loss = -(self.scale * rewards[:, None].expand_as(valid)[valid] * log_probs).sum() / mini_batch_tokens
        self.losses.append(loss.detach())
        return loss

    def end(self) -> dict[str, torch.Tensor]:
        return {"reward_weighted/loss": torch.stack(self.losses).sum()}

    def after_optimizer_step(self) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, checkpoint: dict) -> None:
        pass


@pytest.fixture
def toy_method(tmp_path):
    """The toy kind registered, and its YAML (``method=reward_weighted``) on a search path beside conf/."""
    register_method(RewardWeightedMethod, f"{__name__}.RewardWeightedStep")
    (tmp_path / "conf" / "method").mkdir(parents=True)
    (tmp_path / "conf" / "method" / "reward_weighted.yaml").write_text(
        "defaults:\n  - /settings/method/reward_weighted@_here_\n  - _self_\nname: reward_weighted\n"
    )
    yield f"hydra.searchpath=[file://{tmp_path / 'conf'}]"
    del METHODS[RewardWeightedMethod.KIND]


def compose_toy(search_path: str, *overrides: str):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=[search_path, "method=reward_weighted", *overrides])


def test_the_check_reads_the_new_kinds_settings(toy_method):
    settings = validate_config(compose_toy(toy_method, "method.objective.scale=0.5"))
    assert isinstance(settings.method, RewardWeightedMethod) and settings.method.objective.scale == 0.5
    with pytest.raises(ConfigError) as caught:
        validate_config(compose_toy(toy_method, "method.objective.scale=0", "+method.objective.scal=2"))
    assert sorted(caught.value.problems) == [
        "method.objective.scal=2: not a key of method.objective; did you mean method.objective.scale? "
        "accepted keys: scale",
        "method.objective.scale=0: a positive scale",
    ]
    with pytest.raises(ConfigError, match=r"method.kind='foo': one of \('distill', 'grpo', 'reward_weighted'\)"):
        validate_config(compose_toy(toy_method, "method.kind=foo"))


@pytest.mark.slow
def test_the_new_kind_trains_and_is_reported(toy_method, tmp_path, tiny_model_dir, alternating_reward):
    from demopsd.report.plots import write_report
    from demopsd.training.run import run

    out = tmp_path / "run"
    settings = validate_config(compose_toy(
        toy_method, "debug=smoke", f"paths.output_dir={out}", f"model.name_or_path={tiny_model_dir}",
        "logger.wandb.mode=disabled", "optim.lr=1e-2",
    ))
    before = {k: v.clone() for k, v in load_file(tiny_model_dir / "model.safetensors").items()}
    run(settings)
    losses = pd.read_csv(out / "metrics.csv")["reward_weighted/loss"].dropna()
    assert len(losses) == 2 and all(math.isfinite(v) and v > 0 for v in losses)  # -reward · log π > 0
    after = load_file(out / "model" / "model.safetensors")
    assert sum(not torch.equal(after[k], before[k]) for k in after if k in before) > len(after) // 2
    report = write_report(out, tmp_path / "report")
    assert "reward_weighted" in pd.read_csv(report.table_csv)["method"].tolist()
