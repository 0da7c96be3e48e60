"""Tests for qtemperate.attention_heads: attention found in the module tree, counts written."""

from __future__ import annotations

import torch
from torch import nn

from qtemperate.attention_heads import (
    AttentionHeads,
    attention_like,
    find_attention,
    write_head_count,
)
from tests.quantization.architectures import (
    FusedQKVClassifier,
    HandAttentionClassifier,
    MHAClassifier,
)
from tests.test_pruning import HFBlockClassifier


class TimmStyle(nn.Module):
    """timm's ``Attention`` attributes: fused qkv, num_heads, head_dim, attn_dim, scale."""

    def __init__(self, dim: int = 24, num_heads: int = 3, head_dim: int = 16) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.attn_dim = num_heads, head_dim, num_heads * head_dim
        self.scale = head_dim ** -0.5
        self.fused_attn = True
        self.qkv = nn.Linear(dim, 3 * self.attn_dim)
        self.proj = nn.Linear(self.attn_dim, dim)


def test_attention_is_found_the_way_each_library_writes_it() -> None:
    model = nn.ModuleDict({
        "timm": TimmStyle(),  # head_dim 16 * 3 heads != dim 24: attn_dim is what counts
        "hf": HFBlockClassifier(),
        "hand": HandAttentionClassifier(),
        "mha": MHAClassifier(),
    })
    assert find_attention(model) == [
        AttentionHeads("timm", ("timm.qkv",), 3, 16),
        AttentionHeads("hf.self_attn", ("hf.self_attn.query", "hf.self_attn.key", "hf.self_attn.value"), 4, 8),
        AttentionHeads("hand.attn", ("hand.attn.q", "hand.attn.k", "hand.attn.v"), 4, 8),
    ]
    assert find_attention(FusedQKVClassifier()) == [AttentionHeads("attn", ("attn.qkv",), 4, 8)]
    assert attention_like(MHAClassifier()) == ["attn"]  # nn.MultiheadAttention: advice, not heads
    assert find_attention(MHAClassifier()) == []


def test_attention_whose_attributes_disagree_is_left_out() -> None:
    odd = TimmStyle()
    odd.head_dim = 8  # 3 heads of 8 would be 24 wide; qkv gives 48 per q/k/v
    gqa = HFBlockClassifier()
    gqa.self_attn.key = nn.Linear(32, 16)  # grouped-query attention: k/v narrower than q
    flag = TimmStyle()
    flag.num_heads = True  # a bool is no head count
    assert find_attention(odd) == find_attention(gqa) == find_attention(flag) == []
    assert attention_like(nn.Sequential(nn.Linear(2, 2))) == []


def test_write_head_count_keeps_the_head_size() -> None:
    m = TimmStyle()
    assert write_head_count(m, 3, 2, 16) == ["num_heads", "attn_dim"]
    assert (m.num_heads, m.head_dim, m.attn_dim, m.scale) == (2, 16, 32, 16 ** -0.5)
    hf = HFBlockClassifier().self_attn
    assert write_head_count(hf, 4, 1, 8) == ["num_attention_heads", "all_head_size"]
    assert (hf.num_attention_heads, hf.attention_head_size, hf.all_head_size) == (1, 8, 8)
    assert write_head_count(hf, 1, 1, 8) == []
    assert torch.is_tensor(hf.query.weight)
