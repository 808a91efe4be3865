"""The optimizer ``configure_optimizers`` builds from ``optim``: one or two steps on a float64 linear layer
against their closed forms."""

from types import SimpleNamespace

import pytest
import torch

from demopsd.config.settings import OptimConfig
from demopsd.training.module import SelfDistillationModule

LR = 0.1


def stepped(gradients: list[torch.Tensor], **settings) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight of a 3 × 2 float64 layer before and after one optimizer step per gradient in ``gradients``."""
    layer = torch.nn.Linear(2, 3, bias=False, dtype=torch.float64)
    start = layer.weight.detach().clone()
    holder = SimpleNamespace(policy=layer, optim=OptimConfig(lr=LR, **settings))
    configured = SelfDistillationModule.configure_optimizers(holder)
    optimizer, schedule = configured["optimizer"], configured["lr_scheduler"]["scheduler"]
    for gradient in gradients:
        layer.weight.grad = gradient.clone()
        optimizer.step()
        schedule.step()
    return start, layer.weight.detach()


GRADIENT = torch.tensor([[0.3, -0.02], [1e-3, 2.0], [-0.5, 0.0]], dtype=torch.float64)


def test_sgd_steps_by_the_learning_rate_times_the_gradient():
    start, after = stepped([GRADIENT], name="sgd")
    torch.testing.assert_close(after, start - LR * GRADIENT, rtol=0, atol=1e-15)


def test_sgd_momentum_carries_the_previous_step():
    second = torch.full_like(GRADIENT, 0.25)
    start, after = stepped([GRADIENT, second], name="sgd", momentum=0.9)
    velocity = 0.9 * GRADIENT + second
    torch.testing.assert_close(after, start - LR * GRADIENT - LR * velocity, rtol=0, atol=1e-15)


@pytest.mark.parametrize("scale", [1.0, 100.0])
def test_adamws_first_step_has_the_learning_rates_size_whatever_the_gradients(scale):
    """Bias-corrected moments make AdamW's first step lr · g / (|g| + ε): about lr per nonzero entry, so a
    gradient 100 times larger moves the weights as far, where SGD's step grows with it."""
    start, after = stepped([scale * GRADIENT], name="adamw")
    expected = start - LR * scale * GRADIENT / (scale * GRADIENT.abs() + 1e-8)
    torch.testing.assert_close(after, expected, rtol=0, atol=1e-12)
    sgd_start, sgd_after = stepped([scale * GRADIENT], name="sgd")
    assert float((sgd_after - sgd_start).norm()) == pytest.approx(LR * scale * float(GRADIENT.norm()), rel=1e-12)
