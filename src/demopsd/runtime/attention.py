"""Attention that shares each key/value head with its group of query heads inside the kernel, on a CPU.

transformers' ``"sdpa"`` attention copies every key/value head once per query head of its group (``repeat_kv``)
unless there is no attention mask; left-padded batches always have one. With the default model's 9 query heads
over 3 key/value heads, that copy of the whole KV cache, at every layer of every decoding step, costs a CPU more
than the attention itself. :func:`grouped_sdpa` hands torch's ``scaled_dot_product_attention`` the unrepeated heads
with ``enable_gqa=True`` instead: the same numbers without the copies. On other devices it is transformers'
``"sdpa"`` unchanged, whose kernels there handle masks and head groups their own way.

It is registered with transformers under :data:`GROUPED_SDPA`; :func:`use_grouped_sdpa` switches a loaded model
to it.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

GROUPED_SDPA = "sdpa_grouped_kv"


def grouped_sdpa(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention of ``query`` ``[B, H, Q, D]`` over ``key`` / ``value`` ``[B, H_kv, K, D]`` (``H`` a multiple of
    ``H_kv``) under ``attention_mask`` (``[B, 1, Q, K]``, boolean, or None); returns ``[B, Q, H, D]``."""
    if query.device.type != "cpu" or kwargs.get("position_bias") is not None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    output = torch.nn.functional.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=attention_mask,
        dropout_p=dropout,
        scale=scaling,
        is_causal=bool(query.shape[2] > 1 and attention_mask is None and is_causal),
        enable_gqa=key.shape[1] != query.shape[1],
    )
    return output.transpose(1, 2).contiguous(), None


AttentionInterface.register(GROUPED_SDPA, grouped_sdpa)
AttentionMaskInterface.register(GROUPED_SDPA, sdpa_mask)


def use_grouped_sdpa(model: PreTrainedModel) -> None:
    """Switch ``model`` from ``"sdpa"`` to :func:`grouped_sdpa` if it takes attention functions by name (the
    decoder families of transformers do); any other model is left as it is."""
    if model.config._attn_implementation == "sdpa" and getattr(model, "_supports_attention_backend", False):
        model.set_attn_implementation(GROUPED_SDPA)
