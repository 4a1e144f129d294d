"""SetupCheck: the optimizer and normalization-layer checks, once, when training starts."""

from __future__ import annotations

from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

from diag import signals
from diag.batch import split_batch
from diag.detectors import setup as rules

from .base import NEVER, Monitor


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be True or False, got {value!r}.")
    return value


def hookable_modules(root: nn.Module, prefix: str = "") -> Iterator[Tuple[str, nn.Module]]:
    """``root.named_modules()`` in registration order, leaving out compiled (``torch.compile``) subtrees."""
    # torch.compile wraps modules in OptimizedModule; hooks inside a compiled region would force recompiles.
    # (Recognized by name: importing torch._dynamo costs seconds.)
    if type(root).__name__ == "OptimizedModule" and hasattr(root, "_orig_mod"):
        return
    yield prefix, root
    for name, child in root.named_children():
        yield from hookable_modules(child, f"{prefix}.{name}" if prefix else name)


class SetupCheck(Monitor):
    """Checks the training setup once, when training starts: the optimizer and the normalization layers.

    Findings: ``adam_coupled_weight_decay`` (Adam/RMSprop/Adagrad-type optimizers with an L2 ``weight_decay``:
    use AdamW), ``sgd_without_momentum`` (``info``; a ``warning`` once another monitor sees zig-zag updates or a
    plateau), ``unusual_learning_rate`` (``info``: far outside the usual range for the optimizer),
    ``batchnorm_on_sequence`` (BatchNorm pooling statistics over the tokens of sequences: use LayerNorm) and
    ``batchnorm_small_batch`` (BatchNorm with fewer than 8 samples per batch and device).

    The BatchNorm checks watch the first training batch only, with forward pre-hooks that read input shapes and are
    removed after that batch; nothing in the model, the batch or the optimizer is changed.

    Args:
        optimizer: check the optimizers (weight decay, momentum, learning rate).
        normalization: check the BatchNorm layers on the first training batch.

    Example::

        trainer = pl.Trainer(callbacks=[SetupCheck()])
        trainer.fit(model, train_loader)
        print([f.code for f in trainer.callbacks[0].findings])
    """

    STATE = ("_normalization_done", "_escalated")  # checkpointed (see Monitor.STATE)

    def __init__(self, optimizer: bool = True, normalization: bool = True) -> None:
        super().__init__()
        self.check_optimizer = check_bool("optimizer", optimizer)
        self.check_normalization = check_bool("normalization", normalization)
        self._handles: List[Any] = []
        self._norm_inputs: Dict[str, rules.NormInput] = {}
        self._embedding_called: Optional[str] = None
        self._armed_batch: Optional[Any] = None
        self._normalization_done = False
        self._plain_sgd: List[Tuple[Any, Optional[str]]] = []  # (optimizer, layer label) of SGD without momentum
        self._escalated = False

    def _state_key_args(self) -> Dict[str, Any]:
        return {"optimizer": self.check_optimizer, "normalization": self.check_normalization}

    # ---- optimizer ------------------------------------------------------------------------------
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if not self.check_optimizer:
            return
        optimizers = [rules.unwrap_optimizer(o) for o in (getattr(trainer, "optimizers", None) or [])]
        optimizers = [o for o in optimizers if isinstance(o, torch.optim.Optimizer)]
        self._plain_sgd = []
        for i, optimizer in enumerate(optimizers):
            label = f"optimizer_{i}" if len(optimizers) > 1 else None
            for verdict in (rules.adam_coupled_weight_decay(optimizer, label),
                            rules.unusual_learning_rate(optimizer, label),
                            rules.sgd_without_momentum(optimizer, layer=label)):
                self.report_verdict(verdict)
                if verdict is not None and verdict.code == "sgd_without_momentum":
                    self._plain_sgd.append((optimizer, label))
        self._check_escalation()

    def _check_escalation(self) -> None:
        """Raise ``sgd_without_momentum`` to a warning once zig-zag updates or a plateau are seen."""
        if not self._plain_sgd or self._escalated:
            return
        collector = self._context.collector
        symptom = None
        if collector.has("zigzag_updates", "warning"):
            symptom = "consecutive updates point in opposite directions (zigzag_updates)"
        elif collector.has("loss_plateau", "warning"):
            symptom = "the loss is stuck on a plateau (loss_plateau)"
        elif self._context.get(signals.GRAD_ZIGZAG) is True:
            symptom = "consecutive updates point in opposite directions"
        if symptom is None:
            return
        self._escalated = True
        for optimizer, label in self._plain_sgd:
            self.report_verdict(rules.sgd_without_momentum(optimizer, symptom=symptom, layer=label))

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self._check_escalation()

    # ---- normalization layers -------------------------------------------------------------------
    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if not self.check_normalization or self._normalization_done or self._handles:
            return
        for name, module in hookable_modules(pl_module):
            if rules.is_batchnorm(module):
                self._handles.append(module.register_forward_pre_hook(self._norm_hook(name)))
            elif isinstance(module, nn.Embedding):
                self._handles.append(module.register_forward_pre_hook(self._embedding_hook(name)))
        if not self._handles:
            self._normalization_done = True
            return
        self._armed_batch = batch

    def _norm_hook(self, name: str):
        def hook(module: nn.Module, args: Tuple[Any, ...]) -> None:
            if name not in self._norm_inputs and args and isinstance(args[0], torch.Tensor):
                self._norm_inputs[name] = rules.NormInput(
                    name, type(module).__name__, tuple(int(d) for d in args[0].shape), bool(module.training),
                    isinstance(module, nn.SyncBatchNorm))
        return hook

    def _embedding_hook(self, name: str):
        def hook(module: nn.Module, args: Tuple[Any, ...]) -> None:
            if self._embedding_called is None:
                self._embedding_called = name
        return hook

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._handles:
            self._release()
            # (the batch armed at the start; diag.watch arms before it knows the batch, and hands it over here)
            self._judge_normalization(pl_module, self._armed_batch if self._armed_batch is not None else batch)
            self._armed_batch = None
        self._check_escalation()

    def wants(self, step: int) -> Dict[str, float]:
        """The first batch (normalization layers), then the batch ends until plain SGD's escalation is settled."""
        normalized = self._normalization_done or not self.check_normalization
        return {"on_train_batch_start": NEVER if normalized and not self._handles else step,
                "on_train_batch_end": NEVER if not self._handles and normalized and (
                    not self._plain_sgd or self._escalated) else step}

    def _judge_normalization(self, pl_module: Any, batch: Any) -> None:
        self._normalization_done = True
        observed = list(self._norm_inputs.values())
        self._norm_inputs = {}
        if not observed:
            return
        parts = split_batch(batch)
        batch_size = parts.batch_size if parts is not None else None
        token_inputs = None
        inputs = parts.inputs if parts is not None else None
        if (self._embedding_called and inputs is not None and not inputs.is_floating_point()
                and inputs.dim() >= 2 and inputs.shape[1] > 1):
            token_inputs = (f"integer inputs of shape {tuple(inputs.shape)} go through the embedding "
                            f"{self._embedding_called}")
        sequence_layer = next((f"{type(m).__name__} {n}" for n, m in hookable_modules(pl_module)
                               if n and rules.is_sequence_layer(m)), None)
        self.report_verdict(rules.batchnorm_on_sequence(observed, batch_size, token_inputs, sequence_layer))
        self.report_verdict(rules.batchnorm_small_batch(observed, self.world_size()))

    def _release(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
