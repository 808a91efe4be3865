"""Memory-lean losses from final hidden states and the LM-head weight, in chunks over positions.

The ``[N, V]`` logits of all positions never exist at once (with V = 151,936 and N = 32k tokens one
such fp32 tensor is 20 GB). :func:`chunked_distillation_loss` computes each chunk's logits, loss and
gradients w.r.t. the hidden states and the head during the forward pass, keeps only the ``[c, H]``
and ``[V, H]`` gradients, and scales them in backward: no logits are kept and none are recomputed, so
it costs the same matrix products as the straightforward path. :func:`chunked_token_log_probs` (for
GRPO, whose loss is not a fixed function of the log-probs) recomputes each chunk in backward instead.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from demopsd.config.objectives import DistillationConfig
from demopsd.objectives.distill import TOKEN_STATS, summarize, token_losses, upcast


class _FusedDistillation(torch.autograd.Function):
    """``Σ_t w_t ℓ_t`` with the gradient computed chunk by chunk in forward; statistics go to ``stats_out``."""

    @staticmethod
    def forward(ctx, student_hidden, student_head, teacher_hidden, teacher_head, tokens, token_weights,
                old_log_probs, config, lambda_max, discrepancy_scale, chunk_size, stats_out):
        want_hidden, want_head = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.zeros_like(student_hidden) if want_hidden else None
        grad_head = torch.zeros_like(student_head) if want_head else None
        head = student_head.detach().requires_grad_(want_head)
        total = None
        chunks: dict[str, list[torch.Tensor]] = {name: [] for name in TOKEN_STATS}
        for start in range(0, student_hidden.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            with torch.enable_grad():
                hidden = student_hidden[rows].detach().requires_grad_(want_hidden)
                losses, stats = token_losses(
                    hidden @ head.T,
                    teacher_hidden[rows] @ teacher_head.T,
                    tokens[rows],
                    config,
                    old_log_probs=None if old_log_probs is None else old_log_probs[rows],
                    lambda_max=lambda_max,
                    discrepancy_scale=discrepancy_scale,
                )
                chunk_loss = (token_weights[rows] * losses).sum()
                wanted = [t for t, w in ((hidden, want_hidden), (head, want_head)) if w]
                grads = list(torch.autograd.grad(chunk_loss, wanted)) if wanted else []
            if want_hidden:
                grad_hidden[rows] = grads.pop(0)
            if want_head:
                grad_head += grads.pop(0)
            total = chunk_loss.detach() if total is None else total + chunk_loss.detach()
            for name in TOKEN_STATS:
                chunks[name].append(stats[name])
        stats_out.update({name: torch.cat(values) for name, values in chunks.items()})
        ctx.save_for_backward(grad_hidden, grad_head)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_head = ctx.saved_tensors
        scale = lambda g: None if g is None else g * grad_output.to(g.dtype)  # noqa: E731
        return (scale(grad_hidden), scale(grad_head)) + (None,) * 10


def chunked_distillation(
    student_hidden: torch.Tensor,
    student_head: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_head: torch.Tensor,
    tokens: torch.Tensor,
    token_weights: torch.Tensor,
    config: DistillationConfig,
    *,
    old_log_probs: torch.Tensor | None = None,
    lambda_max: float | None = None,
    discrepancy_scale: float | None = None,
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``Σ_t w_t ℓ_t`` (the loss of :func:`~demopsd.objectives.distill.distillation_loss`) and its detached
    per-token statistics ``[N]`` named in :data:`~demopsd.objectives.distill.TOKEN_STATS`, from hidden states.

    ``student_hidden`` / ``teacher_hidden`` ``[N, H]``, ``student_head`` / ``teacher_head`` ``[V, H]``
    (the teacher's may be an EMA copy); gradients flow to ``student_hidden`` and ``student_head`` only.
    Peak memory beyond the inputs: a few ``[chunk_size, V]`` tensors, ``[N, H]`` and ``[V, H]`` gradients.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r} is invalid: a positive integer is accepted")
    stats: dict[str, torch.Tensor] = {}
    loss = _FusedDistillation.apply(
        student_hidden, student_head, teacher_hidden.detach(), teacher_head.detach(), tokens, token_weights,
        old_log_probs, config, lambda_max, discrepancy_scale, chunk_size, stats,
    )
    return loss, stats


def chunked_distillation_loss(
    student_hidden: torch.Tensor,
    student_head: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_head: torch.Tensor,
    tokens: torch.Tensor,
    token_weights: torch.Tensor,
    config: DistillationConfig,
    **kwargs,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """:func:`~demopsd.objectives.distill.distillation_loss` from hidden states, same values and gradients: the
    loss of :func:`chunked_distillation` (same arguments) and its statistics summarised as 0-dim metrics."""
    loss, stats = chunked_distillation(
        student_hidden, student_head, teacher_hidden, teacher_head, tokens, token_weights, config, **kwargs
    )
    return loss, summarize(loss, stats, token_weights)


def _token_log_probs_and_entropy(hidden: torch.Tensor, head: torch.Tensor, tokens: torch.Tensor):
    log_probs = upcast(hidden @ head.T).log_softmax(-1)
    detached = log_probs.detach()
    entropy = -(detached.exp() * detached).sum(-1)
    return log_probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1), entropy


def chunked_token_log_probs(
    hidden: torch.Tensor, head: torch.Tensor, tokens: torch.Tensor, chunk_size: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """``log p(tokens)`` ``[N]`` (with gradient) and the full-vocabulary entropy ``[N]`` (without),
    from ``hidden`` ``[N, H]`` and ``head`` ``[V, H]``; each chunk's logits are recomputed in backward."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r} is invalid: a positive integer is accepted")
    log_probs, entropies = [], []
    for start in range(0, hidden.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        lp, ent = checkpoint(_token_log_probs_and_entropy, hidden[rows], head, tokens[rows], use_reentrant=False)
        log_probs.append(lp)
        entropies.append(ent)
    return torch.cat(log_probs), torch.cat(entropies)
