"""Qwen2.5-VL's vision attention with its equal-length windows attended in one SDPA call.

With SDPA, transformers' default, the tower's attention makes one call per sequence of its `cu_seqlens`: one
per window in the windowed blocks (16 per 448-px image) and one per image in the full-attention blocks. Eight
pairs at 448 px thus launch about 7,000 attention calls per forward, and the step is bound by Python launching
them, not by the GPU. When every sequence of a call has the same length (every window of an image whose
merged grid is a multiple of the window, and every image of a batch, which share one size), the sequences
are a batch: one call computes the same attention. Other calls (edge windows of smaller sizes) keep the
tower's own code. Flash attention already makes one variable-length call per block and is left alone, and so
is an explicitly requested eager attention.

The routing replaces `forward` on each attention module instance (module names, weights and LoRA targets are
unchanged). It is installed only on the transformers code it was written against (`route_equal_windows`
checks the signature and the helpers it needs) and otherwise leaves the tower as it is.
"""

from __future__ import annotations

import functools
import inspect
import sys

import torch
from torch import nn


def route_equal_windows(tower: nn.Module) -> int:
    """Route the SDPA attention of a Qwen2.5-VL vision tower's blocks through `equal_window_attention`;
    returns how many blocks were routed (0: not SDPA, or transformers code this was not written for)."""
    if getattr(tower.config, "_attn_implementation", None) != "sdpa":
        return 0
    routed = 0
    for block in getattr(tower, "blocks", ()):
        attention = getattr(block, "attn", None)
        rotary = _rotary_of(attention)
        if rotary is None:
            continue
        original = attention.forward
        attention.forward = functools.partial(equal_window_attention, attention, original, rotary)
        routed += 1
    return routed


def _rotary_of(attention: nn.Module | None):
    """The module's own rotary helper, when its forward is the one this file mirrors; else None."""
    if attention is None or "forward" in vars(attention):  # absent, or already routed
        return None
    if not all(hasattr(attention, name) for name in ("qkv", "proj", "num_heads", "scaling")):
        return None
    parameters = inspect.signature(type(attention).forward).parameters
    if list(parameters)[:3] != ["self", "hidden_states", "cu_seqlens"] or "position_embeddings" not in parameters:
        return None
    return getattr(sys.modules[type(attention).__module__], "apply_rotary_pos_emb_vision", None)


def equal_window_attention(attention: nn.Module, original, rotary, hidden_states: torch.Tensor,
                           cu_seqlens: torch.Tensor, position_embeddings=None, **kwargs) -> torch.Tensor:
    """The attention module's forward with all sequences of `cu_seqlens` in one SDPA call when they have one
    length; otherwise (or without position embeddings) the module's own forward."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()  # the module's own path reads them as well
    total = hidden_states.shape[0]
    if position_embeddings is None or not lengths or len(set(lengths)) != 1 or lengths[0] * len(lengths) != total:
        return original(hidden_states, cu_seqlens, position_embeddings=position_embeddings, **kwargs)
    heads = attention.num_heads
    query, key, value = attention.qkv(hidden_states).reshape(total, 3, heads, -1).permute(1, 0, 2, 3).unbind(0)
    cos, sin = position_embeddings
    query, key = rotary(query, key, cos, sin)

    def sequences(x: torch.Tensor) -> torch.Tensor:  # [total, heads, d] -> [sequences, heads, length, d]
        return x.reshape(len(lengths), lengths[0], heads, -1).transpose(1, 2)

    dropout = getattr(attention, "attention_dropout", 0.0) if attention.training else 0.0
    out = nn.functional.scaled_dot_product_attention(sequences(query), sequences(key), sequences(value),
                                                     dropout_p=dropout, scale=attention.scaling)
    return attention.proj(out.transpose(1, 2).reshape(total, -1))
