"""A step's rollouts cut as the reference (verl) cuts them: mini-batches, one optimizer update each, and
micro-batches within a mini-batch, whose gradients accumulate.

A process's rollouts are ``[B*n]`` rows, ``n`` consecutive rows per prompt. :func:`mini_batches` splits them into
equal runs of whole prompt groups (the reference's ``ppo_mini_batch_size``, in prompts); :func:`micro_batches`
packs a mini-batch's rows, in order, into runs that fit a token budget (the reference's dynamic batch size,
``ppo_max_token_len_per_gpu``). :func:`select_rows` cuts the rows of one micro-batch out of the padded batch.
"""

from __future__ import annotations

import torch

from demopsd.rollout.batch import PromptBatch, RolloutBatch


def mini_batches(num_rows: int, group_size: int, updates: int) -> list[range]:
    """``updates`` consecutive, equal row ranges of whole groups of ``group_size`` rows."""
    groups, remainder = divmod(num_rows, group_size)
    if remainder or updates < 1 or groups % updates:
        raise ValueError(
            f"{num_rows} rollouts in groups of {group_size} do not split into {updates} mini-batches of whole "
            "prompts: method.mini_batch_size must divide the prompts each process gets per step"
        )
    size = num_rows // updates
    return [range(start, start + size) for start in range(0, num_rows, size)]


def micro_batches(rows: range, prompt_lengths: torch.Tensor, response_lengths: torch.Tensor,
                  token_budget: int | None) -> list[range]:
    """``rows`` cut, in order, into runs whose padded size (rows × (longest prompt + longest response) of the
    run) is at most ``token_budget``; a row longer than the budget alone forms a run. ``None``: one run.

    ``prompt_lengths`` / ``response_lengths``: ``[num_rows]`` real tokens of every row of the batch.
    """
    if token_budget is None or len(rows) == 0:
        return [rows]
    runs, start = [], rows.start
    longest_prompt = longest_response = 0
    for row in rows:
        prompt, response = max(longest_prompt, int(prompt_lengths[row])), max(longest_response, int(response_lengths[row]))
        if row > start and (row - start + 1) * (prompt + response) > token_budget:
            runs.append(range(start, row))
            start = row
            prompt, response = int(prompt_lengths[row]), int(response_lengths[row])
        longest_prompt, longest_response = prompt, response
    runs.append(range(start, rows.stop))
    return runs


def select_prompts(prompts: PromptBatch, rows: range | list[int]) -> PromptBatch:
    """The prompts of ``rows``, without the left padding all of them share."""
    ids, mask = prompts.ids[rows], prompts.mask[rows]
    width = int(mask.sum(-1).max()) if len(ids) else 0
    return PromptBatch(ids=ids[:, ids.shape[1] - width:], mask=mask[:, mask.shape[1] - width:])


def select_rows(rollouts: RolloutBatch, rows: range) -> RolloutBatch:
    """The rollouts of ``rows``, without the padding all of them share (left of the prompts, right of the
    responses): the same tokens at the same positions, so every forward on them gives the same states. The rows
    need not be whole groups, so the selection has no ``group_size``."""
    mask = rollouts.response_mask[rows]
    width = int(mask.sum(-1).max()) if len(mask) else 0
    return RolloutBatch(
        prompt=select_prompts(rollouts.prompt, rows),
        response_ids=rollouts.response_ids[rows, :width],
        response_mask=mask[:, :width],
        texts=rollouts.texts[rows.start:rows.stop],
        seconds=rollouts.seconds,
        group_size=None,
        log_probs=None if rollouts.log_probs is None else rollouts.log_probs[rows, :width],
    )
