"""03 - Normalize token sequences with LayerNorm, not BatchNorm.

Claim (study note): "For sequential data (text processing) use Layer Normalization, not Batch Normalization:
BatchNorm assumes the samples are independent, but the words of a sentence depend strongly on each other;
LayerNorm normalizes along the feature dimension, so the meaning is not lost."

Sources: Ba, Kiros & Hinton, "Layer Normalization" (2016); Shen et al., "PowerNorm: Rethinking Batch
Normalization in Transformers" (ICML 2020) on why BatchNorm degrades on text.

Both runs: synthetic padded sentences (vocabulary 32, up to 24 tokens, token 0 = padding; nothing downloaded): the
label says whether "positive" tokens (1-8) outnumber "negative" ones (9-16). Training sentences have 3-12 tokens,
validation sentences 18-24, so the share of padding differs between the two, as it does between real batches.
Model: Embedding(32, 32) -> normalization -> Linear+tanh per token -> mean over the real tokens -> Linear; Adam.
* broken: BatchNorm1d over the (batch, features, tokens) tensor: statistics pooled over every position of every
  sentence, padding included, and frozen into running statistics for evaluation;
* fixed:  LayerNorm(32) on each token's features: no statistics shared between tokens or sentences.
On a task this small the accuracy gap is small (about one point of validation accuracy in LayerNorm's favour);
what the example shows is that the mistake is caught on the first batch, before it costs anything.

lightning-diag's SetupCheck looks at what reaches each BatchNorm on the first batch (integer (N, T) inputs through
an nn.Embedding, a BatchNorm input with a token axis) and raises batchnorm_on_sequence. In TensorBoard: the Text
tab (diag/findings) for the finding and its advice; "training loss" for the two curves.

    python examples/03_layernorm_sequences.py [--fast] [--logdir lightning_logs]
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

import _common as C
from diag import Finding

EXAMPLE = "03_layernorm_sequences"
EXPECTED = {"broken": ["batchnorm_on_sequence"], "fixed": []}
# the TensorBoard scalar tags (prefixes) behind the charts the header points at
CHARTS = ["diag/loss"]
VOCAB, LENGTH, DIM, PAD = 32, 24, 32, 0


def token_data(n: int, min_length: int, max_length: int, seed: int = 0):
    """Padded token ids (n, LENGTH) and labels: 1 when tokens 1..8 outnumber tokens 9..16."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, VOCAB, (n, LENGTH), generator=g)
    lengths = torch.randint(min_length, max_length + 1, (n,), generator=g)
    tokens = tokens * (torch.arange(LENGTH)[None, :] < lengths[:, None])  # 0 = padding after the sentence
    positive = ((tokens >= 1) & (tokens <= 8)).sum(1)
    negative = ((tokens >= 9) & (tokens <= 16)).sum(1)
    return tokens, (positive > negative).long()


class TokenBatchNorm(nn.Module):
    """BatchNorm1d applied the way people do it on text: on (batch, features, tokens), i.e. across tokens."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.transpose(1, 2)).transpose(1, 2)


class SequenceClassifier(nn.Module):
    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM, padding_idx=PAD)
        self.norm = norm
        self.mix = nn.Sequential(nn.Linear(DIM, DIM), nn.Tanh())
        self.head = nn.Linear(DIM, 2)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        real = (tokens != PAD).unsqueeze(-1).float()
        h = self.mix(self.norm(self.embed(tokens)))  # (batch, tokens, features)
        return self.head((h * real).sum(1) / real.sum(1).clamp(min=1.0))  # mean over the real tokens


def build(name: str, fast: bool) -> C.Variant:
    x, y = token_data(1200 if fast else 3000, min_length=3, max_length=12, seed=0)
    x_val, y_val = token_data(400, min_length=18, max_length=24, seed=1)
    norm = TokenBatchNorm(DIM) if name == "broken" else nn.LayerNorm(DIM)
    module = C.Model(SequenceClassifier(norm), optimizer=lambda p: torch.optim.Adam(p, lr=3e-3))
    what = "BatchNorm1d across tokens" if name == "broken" else "LayerNorm over features"
    return C.Variant(f"Embedding -> {what} -> Linear/tanh -> mean -> Linear, Adam(3e-3)", module,
                     C.loaders(x, y, x_val, y_val, batch_size=32), epochs=3 if fast else 8, expected=EXPECTED[name])


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, List[Finding]]:
    return C.compare(EXAMPLE, __doc__, argv, build, charts="Custom Scalars 'training loss'")


if __name__ == "__main__":
    main()
