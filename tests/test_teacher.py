import pytest
import torch

from demopsd.training.teacher import ema_update, make_ema_teacher
from tests.helpers import tiny_llama


def test_ema_update_is_the_convex_combination():
    student = tiny_llama(seed=0)
    teacher = make_ema_teacher(student)
    before = {k: v.clone().double() for k, v in teacher.state_dict().items()}
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    ema_update(teacher, student, 0.05)
    after, target = teacher.state_dict(), student.state_dict()
    for name, old in before.items():
        expected = 0.95 * old + 0.05 * target[name].double()
        torch.testing.assert_close(after[name].double(), expected, rtol=0, atol=1e-6)


def test_ema_teacher_is_frozen_and_independent():
    student = tiny_llama()
    teacher = make_ema_teacher(student)
    assert not any(p.requires_grad for p in teacher.parameters())
    assert all(p.requires_grad for p in student.parameters())
    with torch.no_grad():
        next(student.parameters()).add_(1.0)
    assert not torch.equal(next(student.parameters()), next(teacher.parameters()))
    # tied embeddings stay tied in the copy, so the EMA moves the LM head with the embeddings
    assert teacher.lm_head.weight is teacher.model.embed_tokens.weight


def test_rate_one_copies_and_repeated_updates_converge_geometrically():
    student, teacher = tiny_llama(seed=0), make_ema_teacher(tiny_llama(seed=1))
    p_s, p_t0 = next(student.parameters()), next(teacher.parameters()).clone()
    for _ in range(3):
        ema_update(teacher, student, 0.5)
    torch.testing.assert_close(next(teacher.parameters()), p_s + 0.125 * (p_t0 - p_s))
    ema_update(teacher, student, 1.0)
    torch.testing.assert_close(next(teacher.parameters()), p_s, rtol=0, atol=0)


@pytest.mark.parametrize("rate", [0.0, -0.1, 1.5])
def test_bad_rate_is_refused_with_its_value(rate):
    from demopsd.config.methods import DistillMethodConfig

    with pytest.raises(ValueError, match=rf"method.ema_rate={rate}.*\(0, 1\]"):
        DistillMethodConfig(ema_rate=rate)
