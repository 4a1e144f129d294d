"""A zoo of training-time faults, each a real ``Trainer.fit`` with ``Diagnostics()`` at its defaults: right verdict?

The faults are the training-time ones of the taxonomy (Humbatova et al. 2020, "Taxonomy of real faults in deep
learning systems"), TheDeepChecker's injected bugs (Ben Braiek & Khomh) and DeepCrime's mutation operators (Humbatova
et al. 2021), each on at least two shapes of model (MLP, CNN, Transformer, LSTM):

  learning rate 10-100x too high  (a run that learns and then collapses to NaN; an AdamW Transformer stuck at chance)
  learning rate 100-1000x too low (SGD and Adam)
  code bugs                       (shuffled labels, labels one position off in a sequence model, ignored input,
                                   negated loss, softmax into cross-entropy, a graph cut)
  learnable tasks on a plateau    (XOR of signs, a sparse parity: a 10x rate gets through within the fit, never a
                                   code bug)
  other findings, no verdict      (dead units from the init, a deep sigmoid net, saturated tanh from the init,
                                   an exploding init, healthy twins, a stateful LSTM language model)

Each scenario declares its model shape, the verdict it expects (``lr_too_high``, ``lr_too_low``,
``suspected_code_bug``, or None: "no verdict is right here"), codes it must never raise (any severity), and the
finding(s) of its own that would name the problem (reported, not scored). A run is right when it raises the expected
verdict (warning/error), none of the other two, and none of its never-codes. Per verdict: precision and recall over
all runs (a verdict raised where another or none is expected is a false positive; an expected verdict missing is a
false negative).

``--ground-truth`` fits each scenario without ``Diagnostics()`` at learning-rate factors 0.01..100 and prints how far
the loss gets (seed 0): the measurement behind each label. A rate 10x or more away fixes an LR scenario; no rate fixes
a code bug; on an "other finding" scenario no rate 10x away does better (a fresh init or another design would).

Not collected by pytest (a script, like ``healthy_zoo.py``); a measurement, so it always exits 0.

    python tests/benchmarks/fault_zoo.py [--seeds 3] [--only NAME ...] [--quick] [--verbose]
    python tests/benchmarks/fault_zoo.py --ground-truth [--only NAME ...]
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
warnings.filterwarnings("ignore")

import pytorch_lightning as pl  # noqa: E402
from pytorch_lightning.demos.lstm import LightningLSTM, SequenceSampler, SimpleLSTM  # noqa: E402

from diag.callbacks import Diagnostics, LearningRateProbe  # noqa: E402
from tests.helpers import Classifier, digits_loaders, digits_tensors, loaders_from, mlp  # noqa: E402

VERDICTS = ("suspected_code_bug", "lr_too_high", "lr_too_low")
CODE_BUG, TOO_HIGH, TOO_LOW = VERDICTS


# ---- data -----------------------------------------------------------------------------------------------------
def digits(seed: int, batch_size: int = 64):
    return digits_loaders(batch_size=batch_size, seed=seed)


def xor_of_signs(seed: int, n: int = 4000):
    """Learnable: the XOR of the signs of the first two of 12 Gaussian features (a small tanh MLP under Adam at 1e-3
    stays at chance for about 500 steps, then learns to 96%)."""
    x = torch.randn(n, 12, generator=torch.Generator().manual_seed(seed))
    return loaders_from(x, ((x[:, 0] > 0) ^ (x[:, 1] > 0)).long(), seed=seed)


def sparse_parity(seed: int, bits: int = 20, n: int = 4000):
    """Learnable: the parity of the first 3 of ``bits`` random signs (an MLP under Adam at 1e-3 stays at chance for
    300-800 steps, then learns to 100%)."""
    x = torch.randint(0, 2, (n, bits), generator=torch.Generator().manual_seed(seed)).float()
    return loaders_from(x * 2 - 1, (x[:, :3].sum(1) % 2).long(), seed=seed)


def shuffled_digits(seed: int):
    """Bug: the training labels are permuted independently of the images (x and y shuffled separately)."""
    x, y = digits_tensors(seed=seed)
    n_train = 1400
    y_train = y[:n_train][torch.randperm(n_train, generator=torch.Generator().manual_seed(seed + 1))]
    g = torch.Generator().manual_seed(seed)
    train = DataLoader(TensorDataset(x[:n_train], y_train), batch_size=64, shuffle=True, generator=g)
    return train, DataLoader(TensorDataset(x[n_train:], y[n_train:]), batch_size=256)


def count_tokens(seed: int, n: int = 2000, length: int = 12, vocab: int = 20):
    """Sequence classification: are more than half of the tokens from the lower half of the vocabulary?"""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (n, length), generator=g)
    return loaders_from(tokens, ((tokens < vocab // 2).sum(1) > length // 2).long(), seed=seed)


TAG_VOCAB, TAGS, TAG_LEN = 16, 4, 16


def tagging(seed: int, labels_one_ahead: bool = False, n: int = 2000):
    """Per-token tagging of i.i.d. tokens: tag[t] = token[t] mod 4 (learnable by a causal model from token t).

    ``labels_one_ahead``: the bug of a sequence pipeline that shifts as for a language model on a tagging task
    (``x = tokens[:, :-1]``, ``y = tags[:, 1:]``): each position's label is the next token's tag, which a causal
    model cannot see (the tokens are independent), so no weights predict it.
    """
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, TAG_VOCAB, (n, TAG_LEN + 1), generator=g)
    tags = tokens % TAGS
    x, y = (tokens[:, :-1], tags[:, 1:]) if labels_one_ahead else (tokens[:, :-1], tags[:, :-1])
    return loaders_from(x, y, seed=seed)


LM_VOCAB = 32


def markov_stream(seed: int, n: int, vocab: int = LM_VOCAB, stay: float = 0.8) -> torch.Tensor:
    """Tokens of a Markov chain: the next token is ``perm[prev]`` with probability ``stay``, else uniform."""
    rng = np.random.RandomState(seed)
    perm = rng.permutation(vocab)
    out = np.empty(n, dtype=np.int64)
    out[0] = rng.randint(vocab)
    jumps, uniform = rng.rand(n) > stay, rng.randint(vocab, size=n)
    for i in range(1, n):
        out[i] = uniform[i] if jumps[i] else perm[out[i - 1]]
    return torch.from_numpy(out)


def lm_windows(seed: int, n: int = 2000, length: int = 24):
    """Language modelling on Markov-chain sequences: inputs ``s[:, :-1]``, targets ``s[:, 1:]``."""
    s = markov_stream(seed, n * (length + 1)).view(n, length + 1)
    return loaders_from(s[:, :-1], s[:, 1:], seed=seed)


class StreamChunks(Dataset):
    """A token stream cut into consecutive (input, target) chunks of ``bptt`` tokens, as the demo's WikiText2."""

    def __init__(self, stream: torch.Tensor, bptt: int = 20) -> None:
        self.stream, self.bptt = stream, bptt

    def __len__(self) -> int:
        return (len(self.stream) - 1) // self.bptt

    def __getitem__(self, i: int):
        chunk = self.stream[i * self.bptt:(i + 1) * self.bptt + 1]
        return chunk[:-1], chunk[1:]


def stream_loader(seed: int, batch_size: int = 16, bptt: int = 20, batches_per_epoch: int = 100):
    """The demo's batching: row b of every batch continues row b of the previous one (hidden state carried over)."""
    data = StreamChunks(markov_stream(seed, batch_size * bptt * batches_per_epoch + 1), bptt)
    return DataLoader(data, batch_sampler=SequenceSampler(data, batch_size=batch_size))


# ---- models -----------------------------------------------------------------------------------------------------
class DigitsCNN(nn.Module):
    """Conv-BN-ReLU x2 on the 8x8 digits (``norm=False``: no BatchNorm; ``activation`` and ``depth`` vary)."""

    def __init__(self, activation: Callable[[], nn.Module] = nn.ReLU, norm: bool = True, depth: int = 2,
                 width: int = 16) -> None:
        super().__init__()
        layers: List[nn.Module] = []
        channels = 1
        for _ in range(depth):
            layers.append(nn.Conv2d(channels, width, 3, padding=1))
            layers += [nn.BatchNorm2d(width), activation()] if norm else [activation()]
            channels = width
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(2))
        self.head = nn.Linear(4 * width, 10)

    def forward(self, x):
        return self.head(self.features(x.view(-1, 1, 8, 8)).flatten(1))


def encoder(dim: int, depth: int) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(dim, 4, 2 * dim, dropout=0.0, batch_first=True, norm_first=True)
    return nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)


class DigitsViT(nn.Module):
    """A small Vision Transformer: 16 patches of 2x2 pixels of the 8x8 digits, 2 pre-LN encoder layers, mean pool."""

    def __init__(self, dim: int = 32, depth: int = 2) -> None:
        super().__init__()
        self.patch = nn.Linear(4, dim)
        self.pos = nn.Parameter(0.02 * torch.randn(1, 16, dim))
        self.encoder = encoder(dim, depth)
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, 10)

    def forward(self, x):
        patches = x.view(-1, 4, 2, 4, 2).permute(0, 1, 3, 2, 4).reshape(-1, 16, 4)
        return self.head(self.norm(self.encoder(self.patch(patches) + self.pos).mean(1)))


class TokenTransformer(nn.Module):
    """Token embedding + position embedding -> pre-LN encoder.

    ``causal``: a causal mask and one output per position (tagging, language modelling); otherwise mean-pooled to one
    output per sequence. ``forget_tokens``: bug (ignored input), the encoder gets the position embeddings only.
    """

    def __init__(self, vocab: int, out: int, causal: bool = False, forget_tokens: bool = False, dim: int = 32,
                 depth: int = 2, max_len: int = 32) -> None:
        super().__init__()
        self.embed, self.pos = nn.Embedding(vocab, dim), nn.Parameter(0.02 * torch.randn(1, max_len, dim))
        self.encoder = encoder(dim, depth)
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, out)
        self.causal, self.forget_tokens = causal, forget_tokens

    def forward(self, tokens):
        n, t = tokens.shape
        pos = self.pos[:, :t]
        h = pos.expand(n, -1, -1) if self.forget_tokens else self.embed(tokens) + pos
        if self.causal:
            h = self.encoder(h, mask=nn.Transformer.generate_square_subsequent_mask(t), is_causal=True)
            return self.head(self.norm(h))
        return self.head(self.norm(self.encoder(h).mean(1)))


class LSTMTagger(nn.Module):
    """Embedding -> LSTM -> Linear, one output per position (causal: position t sees tokens 0..t)."""

    def __init__(self, vocab: int, out: int, dim: int = 32) -> None:
        super().__init__()
        self.embed, self.rnn = nn.Embedding(vocab, dim), nn.LSTM(dim, dim, batch_first=True)
        self.head = nn.Linear(dim, out)

    def forward(self, tokens):
        return self.head(self.rnn(self.embed(tokens))[0])


class ThroughList(nn.Module):
    """Bug (graph cut): the logits go through a Python list and back (code that 'fixes' a dtype or a device)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x):
        return torch.tensor(self.net(x).tolist(), requires_grad=True)


class Detached(nn.Module):
    """Bug (graph cut): ``.detach()`` on the output, and ``requires_grad_()`` to silence the error it caused."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x).detach().requires_grad_()


class SmallLightningLSTM(LightningLSTM):
    """Lightning's demo ``LightningLSTM`` (its ``training_step``: the full batch's hidden state carried across
    batches), small (2 layers of 32) and on a synthetic token stream instead of WikiText-2."""

    def __init__(self, lr: float = 10.0, vocab: int = LM_VOCAB) -> None:
        pl.LightningModule.__init__(self)  # the demo's own __init__ builds a 4x512 LSTM over a 33278-word vocabulary
        self.model = SimpleLSTM(vocab_size=vocab, ninp=32, nhid=32, nlayers=2, dropout=0.0)
        self.hidden = None
        self.lr = lr

    def prepare_data(self) -> None:  # the demo downloads WikiText-2 here
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def seq_ce(out, y):
    return F.cross_entropy(out.flatten(0, 1), y.flatten())


def negated_ce(out, y):
    """Bug: the loss is maximized."""
    return -F.cross_entropy(out, y)


def negated_seq_ce(out, y):
    return -seq_ce(out, y)


def set_biases(net: nn.Module, value: float) -> nn.Module:
    """Bug in the init: every hidden weight layer's bias set to ``value`` (the output layer keeps its own)."""
    layers = [m for m in net.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    with torch.no_grad():
        for m in layers[:-1]:
            m.bias.fill_(value)
    return net


def normal_weights(net: nn.Module, std: float) -> nn.Module:
    """Bug in the init: weights from N(0, std^2) whatever the fan-in (DeepCrime's weight-initialisation operator)."""
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                m.weight.normal_(0.0, std)
    return net


def scale_weights(net: nn.Module, factor: float) -> nn.Module:
    """Bug in the init: every weight layer ``factor`` times its default scale (activations grow layer by layer)."""
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                m.weight.mul_(factor)
    return net


# ---- scenarios ----------------------------------------------------------------------------------------------------
@dataclass
class Scenario:
    name: str
    shape: str  # mlp | cnn | transformer | lstm
    fault: str  # the fault family (one line of the zoo)
    build: Callable[[int], Tuple[pl.LightningModule, DataLoader, Optional[DataLoader]]]
    steps: int
    expected: Optional[str]  # one of VERDICTS, or None: no verdict is right
    never: Sequence[str] = ("diag_internal_error",)  # codes that must not be raised, at any severity
    own: Sequence[str] = ()  # findings that name the problem (reported, not scored)


class WarmupClassifier(Classifier):
    """A ``Classifier`` whose learning rate warms up linearly from ~0 to ``lr`` over ``warmup_steps`` steps."""

    def __init__(self, net: nn.Module, lr: float, optimizer: str = "sgd", warmup_steps: int = 100, **kwargs) -> None:
        super().__init__(net, lr, optimizer, **kwargs)
        self.warmup_steps = warmup_steps

    def configure_optimizers(self):
        optimizer = super().configure_optimizers()
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.warmup)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def warmup(self, step: int) -> float:
        return min(1.0, (step + 1) / self.warmup_steps)


def C(net, lr, optimizer="adam", **kwargs):  # noqa: N802 - a short builder name keeps the table readable
    return Classifier(net, lr, optimizer, **kwargs)


def scenarios() -> List[Scenario]:
    """The zoo. Comments give the ``--ground-truth`` figures (seed 0): the loss a rate 10x or 100x away reaches."""
    S = Scenario  # noqa: N806
    not_bug = (CODE_BUG, "diag_internal_error")
    return [
        # -- learning rate 10-100x too high: a rate 10-100x lower learns ---------------------------------------------
        # plain SGD at 1.8 (x0.1 reaches 0.02): the loss falls (to 0.03-0.9 by seed) and then jumps back to chance
        S("mlp_sgd_lr1.8_learns_then_collapses", "mlp", "lr too high",
          lambda s: (C(mlp([64, 64, 64, 10]), 1.8, "sgd"), *digits(s)), 400, TOO_HIGH, not_bug),
        # a linear warm-up to 3.0: the loss falls to ~0.12 while the rate is small, then grows to NaN (step ~250)
        S("mlp_sgd_warmup_to_lr3_learns_then_nan", "mlp", "lr too high",
          lambda s: (WarmupClassifier(mlp([64, 128, 10]), 3.0, "sgd", warmup_steps=100), *digits(s)), 400, TOO_HIGH,
          not_bug, ("nonfinite_loss",)),
        # SGD momentum 0.9 at 0.4 (x0.1: 0.01): the loss reaches ~0.3 by step 20, then climbs to 1e3-1e4, no NaN
        S("mlp_sgd_momentum_lr0.4_learns_then_blows_up", "mlp", "lr too high",
          lambda s: (C(mlp([64, 128, 10]), 0.4, "sgd", momentum=0.9), *digits(s)), 400, TOO_HIGH, not_bug,
          ("loss_diverging",)),
        # BatchNorm CNN, SGD momentum 0.9 at 8 (x0.1: 0.02): stuck above chance
        S("cnn_bn_sgd_momentum_lr8", "cnn", "lr too high",
          lambda s: (C(DigitsCNN(), 8.0, "sgd", momentum=0.9), *digits(s)), 300, TOO_HIGH, not_bug),
        # AdamW at 0.3, 100x a working 3e-3 (x0.01: 0.15): stalls at chance, no divergence, no NaN
        S("vit_adamw_lr0.3_stalls_at_chance", "transformer", "lr too high",
          lambda s: (C(DigitsViT(), 0.3, "adamw"), *digits(s)), 300, TOO_HIGH, not_bug),
        # AdamW at 0.1 (x0.1 and x0.01: 0.00): hovers near chance (0.53-0.61 against ln 2)
        S("tokens_transformer_adamw_lr0.1", "transformer", "lr too high",
          lambda s: (C(TokenTransformer(20, 2), 0.1, "adamw"), *count_tokens(s)), 300, TOO_HIGH, not_bug),
        # the demo's stateful LSTM, SGD at 200 (x0.1: 1.6 against chance 3.47): the loss rises to ~1e3
        S("lstm_stateful_lm_sgd_lr200", "lstm", "lr too high",
          lambda s: (SmallLightningLSTM(lr=200.0), stream_loader(s), None), 300, TOO_HIGH, not_bug),
        # -- learning rate 100-1000x too low: the loss barely moves; x100 learns -------------------------------------
        S("mlp_sgd_lr1e-4", "mlp", "lr too low",
          lambda s: (C(mlp([64, 128, 10]), 1e-4, "sgd"), *digits(s)), 300, TOO_LOW, not_bug),
        S("mlp_adam_lr1e-6", "mlp", "lr too low",
          lambda s: (C(mlp([64, 128, 10]), 1e-6, "adam"), *digits(s)), 300, TOO_LOW, not_bug),
        S("cnn_bn_adam_lr1e-5", "cnn", "lr too low",
          lambda s: (C(DigitsCNN(), 1e-5, "adam"), *digits(s)), 300, TOO_LOW, not_bug),
        S("lstm_tagger_sgd_lr1e-3", "lstm", "lr too low",
          lambda s: (C(LSTMTagger(TAG_VOCAB, TAGS), 1e-3, "sgd", loss_fn=seq_ce), *tagging(s)), 300, TOO_LOW, not_bug),
        S("lstm_stateful_lm_sgd_lr0.1", "lstm", "lr too low",
          lambda s: (SmallLightningLSTM(lr=0.1), stream_loader(s), None), 300, TOO_LOW, not_bug),
        # -- code bugs: no rate learns (validation stays at chance), or the objective is wrong -----------------------
        S("mlp_shuffled_labels", "mlp", "shuffled labels",
          lambda s: (C(mlp([64, 128, 10]), 1e-3), *shuffled_digits(s)), 300, CODE_BUG),
        S("cnn_bn_shuffled_labels", "cnn", "shuffled labels",
          lambda s: (C(DigitsCNN(), 3e-3), *shuffled_digits(s)), 300, CODE_BUG),
        S("lstm_tagger_labels_one_ahead", "lstm", "labels one position off",
          lambda s: (C(LSTMTagger(TAG_VOCAB, TAGS), 3e-3, loss_fn=seq_ce), *tagging(s, labels_one_ahead=True)),
          300, CODE_BUG),
        S("causal_transformer_labels_one_ahead", "transformer", "labels one position off",
          lambda s: (C(TokenTransformer(TAG_VOCAB, TAGS, causal=True), 1e-3, "adamw", loss_fn=seq_ce),
                     *tagging(s, labels_one_ahead=True)), 300, CODE_BUG),
        S("mlp_ignores_input", "mlp", "ignored input",
          lambda s: (C(IgnoresInput(), 1e-3), *digits(s)), 300, CODE_BUG),
        S("tokens_transformer_forgets_token_embedding", "transformer", "ignored input",
          lambda s: (C(TokenTransformer(20, 2, forget_tokens=True), 1e-3, "adamw"), *count_tokens(s)), 300, CODE_BUG),
        # the logged loss falls without bound below zero; expected within ~50 steps
        S("mlp_negated_loss", "mlp", "negated loss",
          lambda s: (C(mlp([64, 128, 10]), 1e-3, loss_fn=negated_ce), *digits(s)), 300, CODE_BUG),
        S("transformer_lm_negated_loss", "transformer", "negated loss",
          lambda s: (C(TokenTransformer(LM_VOCAB, LM_VOCAB, causal=True), 1e-3, "adamw", loss_fn=negated_seq_ce),
                     *lm_windows(s)), 300, CODE_BUG),
        # accuracy still rises, but the loss cannot go below ~1.46 (the objective is wrong)
        S("mlp_softmax_into_cross_entropy", "mlp", "softmax into cross-entropy",
          lambda s: (C(nn.Sequential(mlp([64, 128, 10]), nn.Softmax(1)), 1e-3), *digits(s)), 300, CODE_BUG),
        S("cnn_bn_softmax_into_cross_entropy", "cnn", "softmax into cross-entropy",
          lambda s: (C(nn.Sequential(DigitsCNN(), nn.Softmax(1)), 3e-3), *digits(s)), 300, CODE_BUG),
        # no parameter gets a gradient: the loss is flat at every rate
        S("mlp_graph_cut_through_list", "mlp", "graph cut",
          lambda s: (C(ThroughList(mlp([64, 128, 10])), 1e-3), *digits(s)), 300, CODE_BUG, own=("missing_gradients",)),
        S("cnn_bn_graph_cut_detached", "cnn", "graph cut",
          lambda s: (C(Detached(DigitsCNN()), 3e-3), *digits(s)), 300, CODE_BUG, own=("missing_gradients",)),
        # -- a problem with a finding of its own, and no verdict: no rate 10x away does better, a fresh init does ----
        # every hidden unit dead from the first step: flat at chance at every rate
        S("mlp_dead_relu_bias_init", "mlp", "dead units from the init",
          lambda s: (C(set_biases(mlp([64, 128, 128, 10]), -10.0), 1e-3), *digits(s)), 300, None, not_bug,
          ("dead_units",)),
        S("cnn_dead_relu_bias_init", "cnn", "dead units from the init",
          lambda s: (C(set_biases(DigitsCNN(norm=False), -10.0), 3e-3), *digits(s)), 300, None, not_bug,
          ("dead_units",)),
        # a slow design at its best rate (x10 diverges or stalls, x0.1 is slower)
        S("mlp_sigmoid_3layer_sgd_lr2", "mlp", "deep sigmoid net",
          lambda s: (C(mlp([64, 64, 64, 10], nn.Sigmoid), 2.0, "sgd"), *digits(s)), 300, None, not_bug,
          ("non_zero_centered_activation", "vanishing_gradients", "zigzag_updates")),
        S("cnn_sigmoid_3layer_adam", "cnn", "deep sigmoid net",
          lambda s: (C(DigitsCNN(nn.Sigmoid, norm=False, depth=3), 3e-3), *digits(s)), 300, None, not_bug,
          ("non_zero_centered_activation", "vanishing_gradients")),
        # weights N(0, 1): every tanh unit saturated at the start; trained at the rate that does best from this init
        S("mlp_tanh_saturated_init", "mlp", "saturated tanh from the init",
          lambda s: (C(normal_weights(mlp([64, 128, 128, 10], nn.Tanh), 1.0), 1e-2), *digits(s)), 300, None, not_bug,
          ("saturated_activations",)),
        S("cnn_tanh_saturated_init", "cnn", "saturated tanh from the init",
          lambda s: (C(normal_weights(DigitsCNN(nn.Tanh, norm=False), 1.0), 3e-2), *digits(s)), 300, None, not_bug,
          ("saturated_activations",)),
        # every weight 10x its default: first loss ~1900 (MLP) / ~400 (CNN); the rate is the best from this init
        S("mlp_exploding_init", "mlp", "exploding init",
          lambda s: (C(scale_weights(mlp([64, 128, 128, 128, 128, 10]), 10.0), 3e-3), *digits(s)), 300, None,
          not_bug, ("exploding_gradients", "unexpected_initial_loss")),
        S("cnn_exploding_init", "cnn", "exploding init",
          lambda s: (C(scale_weights(DigitsCNN(norm=False, depth=3), 10.0), 1e-2), *digits(s)), 300, None,
          not_bug, ("exploding_gradients", "unexpected_initial_loss")),
        # -- healthy twins of the shapes above (the stateful LSTM: the demo's hidden state carried across batches) ---
        S("mlp_healthy_adam", "mlp", "healthy",
          lambda s: (C(mlp([64, 128, 10]), 1e-3), *digits(s)), 300, None, not_bug),
        S("cnn_bn_healthy_adam", "cnn", "healthy",
          lambda s: (C(DigitsCNN(), 3e-3), *digits(s)), 300, None, not_bug),
        S("vit_healthy_adamw", "transformer", "healthy",
          lambda s: (C(DigitsViT(), 3e-3, "adamw"), *digits(s)), 300, None, not_bug),
        S("lstm_tagger_healthy_adam", "lstm", "healthy",
          lambda s: (C(LSTMTagger(TAG_VOCAB, TAGS), 3e-3, loss_fn=seq_ce), *tagging(s)), 300, None, not_bug),
        S("lstm_stateful_lm_sgd_lr10", "lstm", "healthy (stateful)",
          lambda s: (SmallLightningLSTM(lr=10.0), stream_loader(s), None), 300, None, not_bug),
        # -- learnable tasks on their initial plateau: at step 50 the probe sees what misaligned labels show; a code bug
        # is the wrong verdict. --ground-truth: 10x the rate learns both within the 400 steps (accuracy 0.95, 1.00;
        # 1x: 0.57, 0.70), so lr_too_low is the right one, which one batch cannot show (the probe says so, info)
        S("mlp_xor_of_signs_plateau", "mlp", "plateau (learnable)",
          lambda s: (C(mlp([12, 16, 2], nn.Tanh), 1e-3), *xor_of_signs(s)), 400, TOO_LOW, not_bug),
        S("mlp_sparse_parity_plateau", "mlp", "plateau (learnable)",
          lambda s: (C(mlp([20, 128, 2]), 1e-3), *sparse_parity(s)), 400, TOO_LOW, not_bug),
    ]


class IgnoresInput(nn.Module):
    """Bug (ignored input): the forward pass feeds a tensor of zeros where the batch should go."""

    def __init__(self) -> None:
        super().__init__()
        self.net = mlp([64, 128, 10])

    def forward(self, x):
        return self.net(torch.zeros_like(x))


# ---- running -------------------------------------------------------------------------------------------------------
class ScaleLR(pl.Callback):
    """For ``--ground-truth``: every parameter group's learning rate times ``factor`` from the first step."""

    def __init__(self, factor: float) -> None:
        self.factor = factor

    def on_train_start(self, trainer, pl_module):
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                group["lr"] *= self.factor
        for config in trainer.lr_scheduler_configs:
            config.scheduler.base_lrs = [lr * self.factor for lr in config.scheduler.base_lrs]


class LossLog(pl.Callback):
    def __init__(self) -> None:
        self.losses: List[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss))


class Captured(logging.Handler):
    """Collects lightning-diag's own log lines (e.g. why the probe did not run) during one fit."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: List[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


NO_BUDGET = [False]  # --no-budget: the probe's time budget lifted (the verdict logic alone, whatever it costs)
MIN_STEPS = [0]  # --min-steps: every fit runs at least this many steps (the probe's budget is a share of the fit)


def fit(scenario: Scenario, seed: int, callbacks) -> Tuple[float, pl.Trainer]:
    pl.seed_everything(seed, verbose=False)
    module, train, val = scenario.build(seed)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = pl.Trainer(max_steps=max(scenario.steps, MIN_STEPS[0]), callbacks=list(callbacks), default_root_dir=tmp, logger=False,
                             enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                             num_sanity_val_steps=0, accelerator="cpu", devices=1)
        trainer.fit(module, train, val)
    return time.perf_counter() - started, trainer


@dataclass
class Run:
    scenario: Scenario
    seed: int
    seconds: float
    steps: int
    verdicts: Dict[str, int]  # verdict code -> step it was first raised (warning/error)
    others: List[str]  # other warning/error codes
    internal_errors: int
    never_hit: List[str]
    own_hit: List[str]
    messages: List[str]
    crashed: bool = False  # the fit raised: lightning-diag must never break it

    @property
    def right(self) -> bool:
        expected = {self.scenario.expected} if self.scenario.expected else set()
        return set(self.verdicts) == expected and not self.never_hit and not self.crashed


def run_one(scenario: Scenario, seed: int) -> Run:
    diagnostics = Diagnostics(console=False, **({"lr_probe": LearningRateProbe(budget_fraction=None)}
                                                if NO_BUDGET[0] else {}))
    captured, log = Captured(), logging.getLogger("diag")
    handlers, propagate = log.handlers[:], log.propagate
    log.handlers, log.propagate = [captured], False  # lightning-diag's own lines go with the run's details
    started = time.perf_counter()
    try:
        seconds, trainer = fit(scenario, seed, [diagnostics])
    except Exception as error:  # noqa: BLE001 - a measurement: report the crash and go on
        return Run(scenario, seed, time.perf_counter() - started, -1, {}, [], 0, [], [],
                   [f"the fit raised {type(error).__name__}: {error}"], crashed=True)
    finally:
        log.handlers, log.propagate = handlers, propagate
    findings = diagnostics.findings
    alarms = [f for f in findings if f.severity.rank >= 1]
    verdicts: Dict[str, int] = {}
    for f in alarms:
        if f.code in VERDICTS:
            verdicts.setdefault(f.code, f.step)
    seen = {f.code for f in findings}
    return Run(scenario, seed, seconds, trainer.global_step, verdicts,
               sorted({f.code for f in alarms} - set(VERDICTS)),
               sum(f.code == "diag_internal_error" for f in findings),
               [f"{f.severity.value} {f.code}" for f in findings if f.code in scenario.never],
               [c for c in scenario.own if c in seen],
               [f"{f.severity.value} {f.code}@{f.step} [{f.layer}] {f.message}" for f in findings
                if f.severity.rank >= 1 or f.code in scenario.never or f.code == "diag_internal_error"]
               + [f"log: {line}" for line in captured.lines])


def report(run: Run, verbose: bool) -> None:
    s = run.scenario
    raised = ", ".join(f"{c}@{step}" for c, step in sorted(run.verdicts.items(), key=lambda kv: kv[1])) or "-"
    extra = []
    if run.never_hit:
        extra.append(f"NEVER-CODES {run.never_hit}")
    if s.own:
        extra.append(f"own={run.own_hit or 'none of ' + '/'.join(s.own)}")
    if run.crashed:
        extra.append("FIT RAISED")
    print(f"{'right' if run.right else 'WRONG':5s} {s.name:43s} {s.shape:11s} seed={run.seed} "
          f"expect={s.expected or '-':18s} raised={raised:40s} {run.seconds:5.1f}s "
          f"internal_errors={run.internal_errors}"
          f" other={','.join(run.others) or '-'} {' '.join(extra)}", flush=True)
    if verbose or (not run.right and run.messages):
        for m in run.messages:
            print(f"      {m}", flush=True)


def scores(runs: List[Run]) -> None:
    print("\nverdict               precision            recall")
    for verdict in VERDICTS:
        tp = sum(r.scenario.expected == verdict and verdict in r.verdicts for r in runs)
        fp = sum(r.scenario.expected != verdict and verdict in r.verdicts for r in runs)
        fn = sum(r.scenario.expected == verdict and verdict not in r.verdicts for r in runs)
        precision = f"{tp / (tp + fp):6.1%} ({tp}/{tp + fp})" if tp + fp else "   n/a"
        recall = f"{tp / (tp + fn):6.1%} ({tp}/{tp + fn})" if tp + fn else "   n/a"
        print(f"{verdict:20s}  {precision:20s} {recall}")


def ground_truth(scenario: Scenario, seed: int, factors=(0.01, 0.1, 1.0, 10.0, 100.0)) -> None:
    """Fit without Diagnostics at each LR factor; print the first loss, the best 20-step mean and the last one."""
    cells = []
    for factor in factors:
        log = LossLog()
        seconds, trainer = fit(scenario, seed, [ScaleLR(factor), log])
        losses = np.array(log.losses)
        finite = np.isfinite(losses)
        nan_at = int(np.argmin(finite)) if not finite.all() else None
        windows = [losses[i:i + 20].mean() for i in range(0, len(losses) - 19, 10)] or [losses.mean()]
        best = np.nanmin(np.where(np.isfinite(windows), windows, np.nan)) if np.isfinite(windows).any() else math.nan
        acc = trainer.callback_metrics.get("val_acc")
        cells.append(f"x{factor:g}: {losses[0]:.2f}>{best:.2f}>{windows[-1]:.2f}"
                     + (f" nan@{nan_at}" if nan_at is not None else "")
                     + (f" acc={float(acc):.2f}" if acc is not None else ""))
    print(f"{scenario.name:43s} expect={scenario.expected or '-':18s} " + " | ".join(cells), flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=None, help="scenario names to run (default: all)")
    parser.add_argument("--no-budget", action="store_true",
                        help="lift the probe's time budget (LearningRateProbe(budget_fraction=None)): judges the verdict "
                             "logic alone, not the cost policy")
    parser.add_argument("--min-steps", type=int, default=0,
                        help="run every fit at least this many steps: the probe's default time budget is 10%% of the "
                             "fit, which a 300-step fit of these small models cannot afford (1000: it can)")
    parser.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1 per scenario (3 for the README figures)")
    parser.add_argument("--quick", action="store_true", help="one seed of every scenario")
    parser.add_argument("--verbose", action="store_true", help="print every warning/error finding of every run")
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    parser.add_argument("--ground-truth", action="store_true",
                        help="no Diagnostics: fit at LR factors 0.01..100 and print the losses (the labels' evidence)")
    args = parser.parse_args(argv)
    MIN_STEPS[0] = args.min_steps
    NO_BUDGET[0] = args.no_budget
    torch.set_num_threads(1)
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    chosen = [s for s in scenarios() if not args.only or s.name in args.only]
    unknown = set(args.only or ()) - {s.name for s in chosen}
    if unknown:
        print(f"unknown scenario(s): {sorted(unknown)}; known: {[s.name for s in scenarios()]}")
    if args.list:
        for s in chosen:
            print(f"{s.name:45s} {s.shape:11s} {s.fault:28s} expect={s.expected or '-':18s} steps={s.steps} "
                  f"never={','.join(s.never)} own={','.join(s.own) or '-'}")
        return 0
    seeds = range(1 if args.quick else args.seeds)
    started = time.perf_counter()
    if args.ground_truth:
        print("loss: first > best 20-step mean > last 20-step mean, per LR factor")
        for scenario in chosen:
            ground_truth(scenario, 0)
        print(f"total {time.perf_counter() - started:.0f}s")
        return 0
    runs: List[Run] = []
    for scenario in chosen:
        for seed in seeds:
            run = run_one(scenario, seed)
            runs.append(run)
            report(run, args.verbose)
    scores(runs)
    print(f"{sum(r.right for r in runs)}/{len(runs)} runs right; {sum(r.internal_errors for r in runs)} "
          f"diag_internal_error; total {time.perf_counter() - started:.0f}s")
    return 0


if __name__ == "__main__":
    main()
    sys.exit(0)
