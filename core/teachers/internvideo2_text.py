"""InternVideo2 stage-2's text tower: BERT (layers up to the fusion layer, where text-only
encoding stops; `full=True` declares the rest of the checkpoint's layout) and its MLM head.
Module and parameter names follow the checkpoint's, so its tensors load by name."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from core.teachers.internvideo2_model import InternVideo2Spec

class BertEmbeddings(nn.Module):
    def __init__(self, spec: InternVideo2Spec, full: bool = False):
        super().__init__()
        self.word_embeddings = nn.Embedding(spec.vocab_size, spec.text_width)
        self.position_embeddings = nn.Embedding(spec.max_positions, spec.text_width)
        self.token_type_embeddings = nn.Embedding(spec.type_vocab_size, spec.text_width)
        self.LayerNorm = nn.LayerNorm(spec.text_width, eps=1e-12)
        if full:  # saved by the training code; positions are computed here instead
            self.register_buffer("position_ids", torch.zeros(1, spec.max_positions, dtype=torch.long))

    def forward(self, input_ids: Tensor) -> Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions) + self.token_type_embeddings.weight[0]
        return self.LayerNorm(x)


class BertSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, kv_dim: int):
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(kv_dim, dim), nn.Linear(kv_dim, dim)

    def forward(self, x: Tensor, keep: Tensor) -> Tensor:
        batch, length, dim = x.shape
        q, k, v = (proj(x).view(batch, length, self.heads, -1).transpose(1, 2)
                   for proj in (self.query, self.key, self.value))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])
        return out.transpose(1, 2).reshape(batch, length, dim)


class DenseResidualNorm(nn.Module):
    """BERT's post-norm sublayer output: LayerNorm(dense(h) + residual)."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.dense, self.LayerNorm = nn.Linear(in_dim, dim), nn.LayerNorm(dim, eps=1e-12)

    def forward(self, hidden: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dense(hidden) + residual)


class BertAttention(nn.Module):
    def __init__(self, dim: int, heads: int, kv_dim: int):
        super().__init__()
        self.self = BertSelfAttention(dim, heads, kv_dim)
        self.output = DenseResidualNorm(dim, dim)

    def forward(self, x: Tensor, keep: Tensor) -> Tensor:
        return self.output(self.self(x, keep), x)


class BertIntermediate(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.dense = nn.Linear(dim, hidden)

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.dense(x))


class BertLayer(nn.Module):
    def __init__(self, spec: InternVideo2Spec, cross_attention: bool = False):
        super().__init__()
        self.attention = BertAttention(spec.text_width, spec.text_heads, spec.text_width)
        if cross_attention:  # checkpoint-only: the fusion layers attend to the vision (or audio-visual) tokens
            self.crossattention = BertAttention(spec.text_width, spec.text_heads, spec.cross_attention_width)
        self.intermediate = BertIntermediate(spec.text_width, spec.text_mlp_width)
        self.output = DenseResidualNorm(spec.text_mlp_width, spec.text_width)

    def forward(self, x: Tensor, keep: Tensor) -> Tensor:
        x = self.attention(x, keep)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, spec: InternVideo2Spec, full: bool = False):
        super().__init__()
        layers = spec.text_layers if full else spec.fusion_layer
        self.layer = nn.ModuleList(BertLayer(spec, i >= spec.fusion_layer) for i in range(layers))


class Bert(nn.Module):
    def __init__(self, spec: InternVideo2Spec, full: bool = False):
        super().__init__()
        self.embeddings = BertEmbeddings(spec, full)
        self.encoder = BertEncoder(spec, full)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Text-only encoding: every layer before the fusion layer; [B,L] -> [B,L,D]."""
        keep = attention_mask.bool()
        x = self.embeddings(input_ids)
        for layer in self.encoder.layer:
            x = layer(x, keep)
        return x


class MaskedLMHead(nn.Module):
    """Checkpoint-only: BERT's masked-language-model head (shapes only, never run)."""

    def __init__(self, spec: InternVideo2Spec):
        super().__init__()
        self.predictions = nn.Module()
        self.predictions.transform = nn.Module()
        self.predictions.transform.dense = nn.Linear(spec.text_width, spec.text_width)
        self.predictions.transform.LayerNorm = nn.LayerNorm(spec.text_width)
        self.predictions.decoder = nn.Linear(spec.text_width, spec.vocab_size)
        self.predictions.bias = nn.Parameter(torch.zeros(spec.vocab_size))


class TextEncoder(nn.Module):
    def __init__(self, spec: InternVideo2Spec, full: bool = False):
        super().__init__()
        self.bert = Bert(spec, full)
        if full:
            self.cls = MaskedLMHead(spec)

