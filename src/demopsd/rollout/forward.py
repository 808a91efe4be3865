"""Final hidden states of a causal LM at the positions that predict a response.

The objectives go from hidden states and the LM-head weight to the loss in chunks, so the
``[B, R, V]`` logits are never materialised here.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from demopsd.rollout.batch import PromptBatch


def response_hidden_states(
    model: PreTrainedModel, prompt: PromptBatch, response_ids: torch.Tensor, response_mask: torch.Tensor
) -> torch.Tensor:
    """Hidden states ``[B, R, H]``: row ``b``, column ``t`` is the state that predicts ``response_ids[b, t]``.

    ``prompt`` is left-padded ``[B, P]``; ``response_ids`` / ``response_mask`` are ``[B, R]``.
    Position ids count real tokens only, as in generation, so left padding does not shift them.
    The call goes through the whole model (computing only the last position's logits), not its decoder
    alone, so that a sharded model gathers its embeddings and final norm (:mod:`demopsd.runtime.sharding`);
    the decoder's final output is taken from it as it passes, so no other layer's output is kept.
    """
    input_ids = torch.cat([prompt.ids, response_ids], dim=1)
    attention_mask = torch.cat([prompt.mask, response_mask.to(prompt.mask.dtype)], dim=1)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    captured: list[torch.Tensor] = []
    hook = model.get_decoder().register_forward_hook(lambda module, args, output: captured.append(output[0]))
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
              logits_to_keep=1)
    finally:
        hook.remove()
    width = prompt.ids.shape[1]
    return captured[-1][:, width - 1 : width - 1 + response_ids.shape[1]]


def lm_head_weight(model: PreTrainedModel) -> torch.Tensor:
    """The ``[V, H]`` output-embedding matrix (tied or not)."""
    return model.get_output_embeddings().weight
