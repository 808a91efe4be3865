"""Numerical guards: a non-finite loss or gradient never reaches the weights; collapse is flagged.

Real ``lightning.Trainer`` runs on CPU with a tiny module (and one with the real
``SelfDistillationModule`` on a tiny Llama, rollouts stubbed), a few steps each.
"""

import copy
import logging
import math
import warnings

import lightning as L
import pandas as pd
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import demopsd.rollout.scored
import demopsd.training.guards
import demopsd.training.steps
from demopsd.config.objectives import DistillationConfig
from demopsd.config.sections import GuardConfig
from demopsd.config.settings import OptimConfig, RepromptConfig, SamplingConfig
from demopsd.data.types import MCQExample
from demopsd.rollout.batch import PromptBatch, RolloutBatch
from demopsd.training.guards import CollapseTracker, NonFiniteTrainingError, NumericalGuard, nonfinite_gradients
from demopsd.training.module import SelfDistillationModule
from demopsd.training.steps import DistillationStep
from tests.helpers import tiny_llama

NAN = float("nan")


@pytest.fixture(autouse=True)
def _quiet_lightning():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(training_step. returned .None|does not have many workers|"
                                                  "GPU available|TPU available|HPU available).*")
        yield


def nan_gradient(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in the forward pass; its gradient becomes NaN in the backward pass (the loss stays finite)."""
    out = tensor.clone()
    out.register_hook(lambda grad: torch.full_like(grad, NAN))
    return out


class TinyModule(L.LightningModule):
    """A 2-layer regression net with AdamW (weight decay on); NaN loss / gradient injected at given steps.

    ``nan_loss``: ``"none"`` returns None like ``SelfDistillationModule``; ``"backward"`` returns the NaN loss.
    ``entropy``: values logged as ``train/entropy``, one per step.
    """

    def __init__(self, nan_loss_steps=(), nan_grad_steps=(), nan_loss="none", entropy=None):
        super().__init__()
        torch.manual_seed(0)
        self.first, self.second = nn.Linear(4, 8), nn.Linear(8, 1)
        self.nan_loss_steps, self.nan_grad_steps = set(nan_loss_steps), set(nan_grad_steps)
        self.nan_loss, self.entropy = nan_loss, entropy

    def training_step(self, batch, batch_idx):
        x, y = batch
        weight = nan_gradient(self.first.weight) if self.global_step in self.nan_grad_steps else self.first.weight
        loss = F.mse_loss(self.second(torch.tanh(F.linear(x, weight, self.first.bias))), y)
        if self.entropy is not None:
            self.log("train/entropy", float(self.entropy[self.global_step]), on_step=True)
        if self.global_step in self.nan_loss_steps:
            loss = loss * NAN
            if self.nan_loss == "none":
                return None
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.1)


class Snapshots(Callback):
    """Weights and optimizer state at the start of every step, and at the end: ``[k]`` is before step k."""

    def __init__(self, module_attr: str | None = None):
        self.module_attr = module_attr  # a submodule to snapshot as well (the EMA teacher)
        self.weights, self.optimizer, self.extra = [], [], []

    def _take(self, trainer, pl_module):
        self.weights.append({k: v.detach().clone() for k, v in pl_module.named_parameters()})
        self.optimizer.append(copy.deepcopy(trainer.optimizers[0].state_dict()["state"]))
        if self.module_attr:
            self.extra.append({k: v.clone() for k, v in getattr(pl_module, self.module_attr).state_dict().items()})

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._take(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        self._take(trainer, pl_module)


def same(a: dict, b: dict) -> bool:
    """Nested dicts of tensors/numbers equal exactly."""
    if a.keys() != b.keys():
        return False
    return all(same(a[k], b[k]) if isinstance(a[k], dict) else
               torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)


def fit(module, tmp_path, *, max_steps=5, guard=None, callbacks=(), checkpoint=None):
    guard = guard or NumericalGuard()
    snapshots = Snapshots()
    data = TensorDataset(torch.randn(64, 4), torch.randn(64, 1))
    trainer = L.Trainer(
        max_steps=max_steps, accelerator="cpu", logger=CSVLogger(tmp_path, name="", version=""),
        callbacks=[guard, snapshots, *callbacks, *([checkpoint] if checkpoint else [])],
        enable_checkpointing=checkpoint is not None, enable_progress_bar=False, enable_model_summary=False,
        gradient_clip_val=1.0, log_every_n_steps=1,
    )
    try:
        trainer.fit(module, DataLoader(data, batch_size=4))
    finally:
        trainer.loggers[0].save()
    return snapshots, pd.read_csv(tmp_path / "metrics.csv")


def skipped_column(metrics: pd.DataFrame) -> list[float]:
    return metrics["train/skipped_steps"].dropna().tolist()


# ---------------------------------------------------------------------------------- skipping
@pytest.mark.parametrize("nan_loss", ["none", "backward"])
def test_a_nonfinite_loss_skips_the_update(nan_loss, tmp_path, caplog):
    """Whether training_step returns None or the NaN loss itself, step 2 leaves weights and AdamW state alone."""
    with caplog.at_level(logging.WARNING, logger="demopsd.training.guards"):
        snaps, metrics = fit(TinyModule(nan_loss_steps={2}, nan_loss=nan_loss), tmp_path)

    assert same(snaps.weights[2], snaps.weights[3]) and same(snaps.optimizer[2], snaps.optimizer[3])
    assert int(snaps.optimizer[3][0]["step"]) == 2  # two real updates so far
    for k in (0, 1, 3, 4):
        assert not same(snaps.weights[k], snaps.weights[k + 1])
    assert skipped_column(metrics) == [0, 0, 1, 1, 1]
    assert all(torch.isfinite(w).all() for w in snaps.weights[-1].values())
    assert "Skipped an update at step 2: the loss was non-finite" in caplog.text


def test_a_nonfinite_gradient_skips_the_update_and_names_the_parameter(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="demopsd.training.guards"):
        snaps, metrics = fit(TinyModule(nan_grad_steps={2}), tmp_path)

    assert same(snaps.weights[2], snaps.weights[3]) and same(snaps.optimizer[2], snaps.optimizer[3])
    assert not same(snaps.weights[3], snaps.weights[4])
    assert skipped_column(metrics) == [0, 0, 1, 1, 1]
    assert "non-finite gradients in 1 parameter(s): first.weight" in caplog.text


def test_a_finite_run_skips_nothing(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="demopsd.training.guards"):
        snaps, metrics = fit(TinyModule(), tmp_path)

    assert skipped_column(metrics) == [0, 0, 0, 0, 0]
    assert all(not same(snaps.weights[k], snaps.weights[k + 1]) for k in range(5))
    assert caplog.text == ""


def test_consecutive_skips_stop_the_run_and_point_at_the_last_checkpoint(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "checkpoints", every_n_train_steps=1, save_last=True)
    guard = NumericalGuard(GuardConfig(max_consecutive_skips=3))
    with pytest.raises(NonFiniteTrainingError) as error:
        fit(TinyModule(nan_loss_steps=range(2, 100)), tmp_path, max_steps=20, guard=guard, checkpoint=checkpoint)

    message = str(error.value)
    assert isinstance(error.value, RuntimeError)
    assert "3 updates in a row (steps 2-4) were skipped" in message
    assert "guards.max_consecutive_skips=3" in message and "the loss was non-finite" in message
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert str(last) in message and last.is_file()
    state = torch.load(last, weights_only=False)["state_dict"]
    assert all(torch.isfinite(v).all() for v in state.values())


def test_the_stop_message_says_when_there_is_no_checkpoint(tmp_path):
    with pytest.raises(NonFiniteTrainingError, match="No checkpoint has been written yet"):
        fit(TinyModule(nan_grad_steps=range(100)), tmp_path, guard=NumericalGuard(GuardConfig(max_consecutive_skips=2)))


def test_a_good_step_resets_the_consecutive_count(tmp_path):
    """Skips at 1, 2, 4, 5 with a limit of 3 in a row: the run finishes; 4 skipped in all."""
    _, metrics = fit(TinyModule(nan_loss_steps={1, 2, 4, 5}), tmp_path, max_steps=7,
                     guard=NumericalGuard(GuardConfig(max_consecutive_skips=3)))
    assert skipped_column(metrics) == [0, 1, 2, 2, 3, 4, 4]


def test_nonfinite_gradients_names_the_first_few():
    net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    net[1].bias.grad[0] = math.inf
    net[0].weight.grad[1, 1] = NAN
    assert nonfinite_gradients(net, list(net.parameters())) == ["0.weight", "1.bias"]


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="guards.max_consecutive_skips=0"):
        GuardConfig(max_consecutive_skips=0)
    with pytest.raises(ValueError, match="guards.warmup_steps=0"):
        GuardConfig(warmup_steps=0)
    with pytest.raises(ValueError, match="guards.length_collapse_ratio=1.5"):
        GuardConfig(length_collapse_ratio=1.5)


# ---------------------------------------------------------------------------------- collapse
def test_collapse_tracker_warns_once_per_collapse(caplog):
    tracker = CollapseTracker("entropy", ratio=0.2, warmup_steps=3)
    values = [2.0, 1.0, 3.0, 0.5, 0.39, 0.1, NAN, 0.2, 0.45, 0.3, 0.1]  # reference mean 2.0, threshold 0.4
    with caplog.at_level(logging.WARNING, logger="demopsd.training.guards"):
        flags = [tracker.update(v) for v in values]

    assert tracker.reference == pytest.approx(2.0)
    assert flags == [False, False, False, False, True, True, True, True, False, True, True]
    warnings_ = [r.getMessage() for r in caplog.records]
    assert len(warnings_) == 2  # at 0.39, and again at 0.3 after recovering at 0.45
    assert warnings_[0].startswith("Entropy collapse: train/entropy=0.39 is below 0.2 × its mean")


def test_collapse_ratio_zero_never_warns(caplog):
    tracker = CollapseTracker("length", ratio=0.0, warmup_steps=1)
    assert [tracker.update(v) for v in (10.0, 0.0, 0.0)] == [False, False, False]
    assert caplog.text == ""


def test_the_guard_flags_collapse_of_a_logged_metric(tmp_path, caplog, monkeypatch):
    entropy = [1.0, 2.0, 1.0, 2.0, 1.0, 1.5, 0.2, 0.1]  # reference mean 1.4 over 5 steps: threshold 0.28
    alerts = []
    monkeypatch.setattr(demopsd.training.guards, "alert", lambda loggers, title, text: alerts.append((title, text)))
    with caplog.at_level(logging.WARNING, logger="demopsd.training.guards"):
        _, metrics = fit(TinyModule(entropy=entropy), tmp_path, max_steps=8)

    assert metrics["guards/entropy_collapse"].dropna().tolist() == [0, 0, 0, 0, 0, 0, 1, 1]
    assert "guards/length_collapse" not in metrics  # train/response_length never logged
    assert caplog.text.count("Entropy collapse") == 1
    # the same warning, once, as a W&B alert
    assert len(alerts) == 1 and alerts[0][0] == "entropy collapse"
    assert alerts[0][1].startswith("Entropy collapse: train/entropy=0.2 is below 0.2 × its mean")


# ---------------------------------------------------------------------------------- the real module
@pytest.fixture
def stubbed_rollouts(monkeypatch):
    """Prompts and rollouts without a tokenizer: fixed token ids derived from the text, 5 response tokens."""

    def encode_prompts(tokenizer, conversations, **kwargs):
        ids = torch.tensor([[3 + ord(ch) % 60 for ch in c[-1]["content"][-8:]] for c in conversations])
        return PromptBatch(ids=ids, mask=torch.ones_like(ids))

    class StubEngine:
        uses_policy_weights = False

        def generate(self, prompts, sampling, greedy=False, entropy=False):
            n = sampling.n
            rows = prompts.ids.shape[0] * n
            generator = torch.Generator().manual_seed(int(prompts.ids.sum()))
            response = torch.randint(3, 64, (rows, 5), generator=generator)
            prompt = PromptBatch(prompts.ids.repeat_interleave(n, 0), prompts.mask.repeat_interleave(n, 0))
            return RolloutBatch(prompt, response, torch.ones_like(response), ["<answer>A</answer>"] * rows, 0.01, n)

        def policy_updated(self):
            pass

        def sync(self):
            pass

    monkeypatch.setattr(demopsd.rollout.scored, "encode_prompts", encode_prompts)
    monkeypatch.setattr(demopsd.training.steps, "encode_prompts", encode_prompts)
    # no tokenizer to find the answer letters' tokens with (tests/test_answer_letter_probe.py covers that)
    monkeypatch.setattr(demopsd.training.steps, "answer_letter_positions", lambda *args: ([], [], []))
    return lambda local_rank=0: StubEngine()


def test_self_distillation_module_skips_policy_teacher_and_schedule(tmp_path, monkeypatch, stubbed_rollouts, caplog):
    """NaN loss at step 1 and a NaN gradient at step 3: policy, EMA teacher and LR warm-up stand still there."""
    policy, sampling = tiny_llama(), SamplingConfig(n=2, max_new_tokens=5)
    step = DistillationStep(policy, None, DistillationConfig(top_k=8), sampling,
                            RepromptConfig(use_reference_answer=True), teacher_kind="ema", ema_rate=0.5)
    module = SelfDistillationModule(policy, None, step, sampling,
                                    optim=OptimConfig(lr=1e-2, warmup_steps=2, grad_clip=1.0),
                                    make_rollout_engine=stubbed_rollouts)
    real_loss = demopsd.training.steps.chunked_distillation

    def loss_with_nan_at_step_1(*args, **kwargs):
        loss, stats = real_loss(*args, **kwargs)
        return (loss * NAN if module.global_step == 1 else loss), stats

    monkeypatch.setattr(demopsd.training.steps, "chunked_distillation", loss_with_nan_at_step_1)
    embedding = module.policy.model.embed_tokens.weight
    embedding.register_hook(lambda g: torch.full_like(g, NAN) if module.global_step == 3 else g)

    examples = [MCQExample(f"Question {i}?\nA: yes\nB: no", "A", "Answer.", i, "AB") for i in range(12)]
    snapshots = Snapshots(module_attr="teacher")
    trainer = L.Trainer(
        max_steps=5, accelerator="cpu", logger=CSVLogger(tmp_path, name="", version=""),
        callbacks=[NumericalGuard(), snapshots], enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, log_every_n_steps=1,
    )
    with caplog.at_level(logging.WARNING, logger="demopsd.training.guards"):
        trainer.fit(module, DataLoader(examples, batch_size=2, collate_fn=list))

    policy, teacher = snapshots.weights, snapshots.extra
    for k in (1, 3):
        assert same(policy[k], policy[k + 1]) and same(teacher[k], teacher[k + 1])
        assert same(snapshots.optimizer[k], snapshots.optimizer[k + 1])
    assert same(policy[0], policy[1])  # the warm-up's first learning rate is 0, as the reference's
    assert not same(snapshots.optimizer[0], snapshots.optimizer[1])  # ... but the update ran (Adam's moments)
    for k in (2, 4):
        assert not same(policy[k], policy[k + 1]) and not same(teacher[k], teacher[k + 1])
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.last_epoch == 3  # warm-up advanced by the 3 real updates only
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-2)  # 3 updates: past the 2-step ramp
    metrics = pd.read_csv(tmp_path / "metrics.csv")
    assert skipped_column(metrics) == [0, 1, 1, 2, 2]
    assert "step 1: the loss was non-finite" in caplog.text
    assert "step 3: non-finite gradients in 1 parameter(s): policy.model.embed_tokens.weight" in caplog.text


def test_a_step_changes_teacher_and_schedule_when_one_of_its_updates_was_not_skipped(tmp_path, monkeypatch,
                                                                                     stubbed_rollouts):
    """Two updates a step: at step 1 only the second (the last) has a NaN loss, at step 3 both. The guard alone
    knows which: step 1 still moves the policy, the EMA teacher and the schedule; step 3 moves none of them."""
    policy, sampling = tiny_llama(), SamplingConfig(n=2, max_new_tokens=5)
    step = DistillationStep(policy, None, DistillationConfig(top_k=8), sampling,
                            RepromptConfig(use_reference_answer=True), teacher_kind="ema", ema_rate=0.5)
    module = SelfDistillationModule(policy, None, step, sampling, optim=OptimConfig(lr=1e-2, warmup_steps=0),
                                    make_rollout_engine=stubbed_rollouts, updates_per_batch=2)
    real_loss, calls = demopsd.training.steps.chunked_distillation, []

    def loss_with_nan(*args, **kwargs):  # one call per update: one micro-batch per mini-batch
        loss, stats = real_loss(*args, **kwargs)
        calls.append(module.global_step)
        nan = module.global_step == 3 or (module.global_step == 1 and calls.count(1) == 2)
        return (loss * NAN if nan else loss), stats

    monkeypatch.setattr(demopsd.training.steps, "chunked_distillation", loss_with_nan)
    examples = [MCQExample(f"Question {i}?\nA: yes\nB: no", "A", "Answer.", i, "AB") for i in range(10)]
    snapshots, guard = Snapshots(module_attr="teacher"), NumericalGuard()
    trainer = L.Trainer(
        max_steps=5, accelerator="cpu", logger=CSVLogger(tmp_path, name="", version=""),
        callbacks=[guard, snapshots], enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, log_every_n_steps=1,
    )
    trainer.fit(module, DataLoader(examples, batch_size=2, collate_fn=list))

    assert calls == [step for step in range(5) for _ in range(2)]
    policy, teacher = snapshots.weights, snapshots.extra
    for k in (0, 1, 2, 4):
        assert not same(policy[k], policy[k + 1]) and not same(teacher[k], teacher[k + 1])
    assert same(policy[3], policy[4]) and same(teacher[3], teacher[4])
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == 4  # every step but the third
    assert skipped_column(pd.read_csv(tmp_path / "metrics.csv")) == [0, 1, 1, 3, 3]
    assert guard.step_updates == [False, False]  # the last step's two updates, both applied
