"""DataMonitor: input normalization, class balance and train/validation overlap, on the batches Lightning hands over."""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from diag import signals
from diag.batch import BatchParts, batch_parts
from diag.detectors import data as rules
from diag.stats.data import (MAX_HASH_BYTES_PER_BATCH, DigestSet, FeatureMoments, LabelCounts, feature_axis,
                             sample_digests, summarize)

from .base import NEVER, Monitor, check_positive_int
from .setup_check import hookable_modules

_WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_WEIGHTED_LOSSES = (nn.CrossEntropyLoss, nn.NLLLoss, nn.BCEWithLogitsLoss, nn.BCELoss)


def _check_key(name: str, value: Any) -> Optional[Union[str, int]]:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (str, int))):
        raise TypeError(f"`{name}` must be a key (str), an index (int) or None, got {value!r}.")
    return value


class DataMonitor(Monitor):
    """Looks at the data itself, on the batches Lightning already hands the callbacks (no extra loading, no change).

    Findings: ``inputs_not_normalized`` (float inputs far from zero mean / unit scale, scales differing by orders of
    magnitude, raw 0-255 intensities; integer token ids are not features), ``class_imbalance`` (one label per
    sample, counted over the first training epoch) and ``train_val_overlap`` (training and validation samples with
    identical inputs, found by hashing a bounded number of samples).

    Cost: the input moments and training-sample hashes use the first ``max_batches`` training batches only (at most
    64k values and 4 MB of samples from each); labels are counted on the device over the first epoch (no host sync
    per batch); validation inputs are hashed during the first validation run (at most 4 MB per batch and
    ``max_hashes`` samples in all). After the first epoch every hook returns at once. Statistics are per process: under DDP each rank judges its
    own shard (rank zero reports), and the overlap share counts the pairs that land on rank zero.

    Inputs and targets are found for tuples/lists ``(x, y)``, dicts with obvious keys (``x``/``input(s)``/``image``/
    ``features``/``input_ids``, ``y``/``label(s)``/``target(s)``) and plain tensors; other batches are skipped unless
    ``input_key``/``target_key``/``select`` point at the parts.

    Args:
        max_batches: training batches whose inputs are summarized and hashed.
        max_hashes: the most samples hashed per split (bounds memory: about 100 bytes each).
        input_key: key, index or attribute of the inputs in a batch, when not recognized.
        target_key: key, index or attribute of the targets.
        select: a callable ``batch -> (inputs, targets)`` (either may be ``None``); wins over the keys.

    Example::

        trainer = pl.Trainer(callbacks=[DataMonitor(input_key="pixels", target_key="cls")])
        trainer.fit(model, train_loader, val_loader)
    """

    STATE = ("_inputs_done", "_targets_done", "_labels_done", "_overlap_done")  # checkpointed (see Monitor.STATE)

    def __init__(self, max_batches: int = 8, max_hashes: int = 100_000, input_key: Optional[Union[str, int]] = None,
                 target_key: Optional[Union[str, int]] = None,
                 select: Optional[Callable[[Any], Tuple[Any, Any]]] = None) -> None:
        super().__init__()
        self.max_batches = check_positive_int("max_batches", max_batches)
        self.max_hashes = check_positive_int("max_hashes", max_hashes)
        self.input_key = _check_key("input_key", input_key)
        self.target_key = _check_key("target_key", target_key)
        if select is not None and not callable(select):
            raise TypeError(f"`select` must be a callable batch -> (inputs, targets) or None, got {select!r}.")
        self.select = select
        self._reset_run_state()
        self._inputs_done = False
        self._targets_done = False
        self._labels_done = False
        self._overlap_done = False

    def _reset_run_state(self) -> None:
        self._epochs_seen = 0
        self._moments = FeatureMoments()
        self._target_moments = FeatureMoments()
        self._target_batches = 0
        self._feature_axis: Optional[int] = None
        self._input_ndim = 0
        self._input_batches = 0
        self._labels = LabelCounts()
        self._train_digests = DigestSet(self.max_hashes)
        self._val_digests = DigestSet(self.max_hashes)
        self._hash_batches = 0
        self._train_hashing_done = False
        self._val_complete = False
        self._samples_per_batch: Optional[int] = None
        self._handles: List[Any] = []
        self._armed_once = False
        self._first_layer: Optional[Tuple[str, Optional[Dict[str, torch.Tensor]], bool]] = None
        self._last_linear_width: Optional[int] = None
        self._raw_inputs: Optional[torch.Tensor] = None

    def _state_key_args(self) -> Dict[str, Any]:
        return {"input_key": self.input_key, "target_key": self.target_key}

    def _parts(self, batch: Any) -> Optional[BatchParts]:
        return batch_parts(batch, self.input_key, self.target_key, self.select)

    # ---- training batches -----------------------------------------------------------------------
    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self._reset_run_state()

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self._measured_all():
            return
        parts = self._parts(batch)
        if parts is None:
            return
        if self._samples_per_batch is None and parts.batch_size:
            self._samples_per_batch = parts.batch_size
            self._context.publish(signals.BATCH_SIZE, parts.batch_size)
        inputs = parts.inputs
        if not self._armed_once:
            self._armed_once = True
            self._arm_hooks(pl_module, parts)
        if not self._inputs_done and inputs is not None and self._input_batches < self.max_batches:
            self._update_moments(inputs)
        if not self._targets_done and self._target_batches < self.max_batches:
            self._update_targets(parts.targets)
        if not self._labels_done:
            if parts.targets is None or not self._labels.update(parts.targets):
                self._labels_done = True  # no (single) class label per sample: nothing to count
        if not self._train_hashing_done and inputs is not None:
            self._train_digests.add(sample_digests(inputs, parts.mask, max_bytes=MAX_HASH_BYTES_PER_BATCH))
            self._hash_batches += 1
            if self._hash_batches >= self.max_batches or self._train_digests.full:
                self._train_hashing_done = True

    def _update_moments(self, inputs: torch.Tensor) -> None:
        if self._input_ndim == 0:
            self._input_ndim = inputs.dim()
            self._feature_axis = feature_axis(inputs.shape)
        if not self._moments.update(inputs, self._feature_axis):
            if self._input_batches == 0:
                self._inputs_done = True  # integer ids or a shape we do not summarize
            return
        self._input_batches += 1

    def _update_targets(self, targets: Any) -> None:
        """Moments of float targets (one column per target value of a sample); anything else ends the count."""
        if not isinstance(targets, torch.Tensor) or not targets.is_floating_point() or targets.dim() == 0 \
                or not self._target_moments.update(targets.detach().reshape(targets.shape[0], -1), 1):
            self._targets_done = True
            return
        self._target_batches += 1

    def _arm_hooks(self, pl_module: Any, parts: BatchParts) -> None:
        """For the first batch only: what the first weight layer receives (does the model normalize float inputs
        itself?) and how wide the last linear layer's output is (as many classes as labels?)."""
        if not isinstance(pl_module, nn.Module):
            return
        float_inputs = parts.inputs is not None and parts.inputs.is_floating_point()
        self._raw_inputs = parts.inputs if float_inputs else None
        for name, module in hookable_modules(pl_module):
            if float_inputs and isinstance(module, _WEIGHT_LAYERS):
                self._handles.append(module.register_forward_pre_hook(self._first_layer_hook(name)))
            if parts.targets is not None and isinstance(module, nn.Linear):
                self._handles.append(module.register_forward_hook(self._linear_output_hook))

    def _first_layer_hook(self, name: str):
        def hook(module: nn.Module, args: Tuple[Any, ...]) -> None:
            if self._first_layer is not None or not args or not isinstance(args[0], torch.Tensor):
                return
            x = args[0]
            raw = self._raw_inputs
            same = raw is not None and x.data_ptr() == raw.data_ptr() and x.numel() == raw.numel()
            axis = x.dim() - 1 if isinstance(module, nn.Linear) else 1
            self._first_layer = (name, summarize(x, axis), same)
        return hook

    def _linear_output_hook(self, module: nn.Module, args: Tuple[Any, ...], output: Any) -> None:
        if isinstance(output, torch.Tensor) and output.dim() >= 1:
            self._last_linear_width = int(output.shape[-1])

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._handles:
            self._release()
            self._raw_inputs = None
        if not self._inputs_done and self._input_batches >= self.max_batches:
            self._judge_inputs()
        if not self._targets_done and self._target_batches >= self.max_batches:
            self._judge_targets()

    def _measured_all(self) -> bool:
        return self._epochs_seen > 0 or (self._inputs_done and self._targets_done and self._labels_done
                                         and self._train_hashing_done)

    def wants(self, step: int) -> Dict[str, float]:
        """Training batches until everything is measured (the first epoch at most)."""
        return {"on_train_batch_start": NEVER if self._measured_all() else step,
                "on_train_batch_end": NEVER if not self._handles and ((self._inputs_done and self._targets_done)
                                                                      or self._epochs_seen > 0) else step}

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if self._epochs_seen == 0:
            self._finish_first_epoch(pl_module)
        self._epochs_seen += 1

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self._epochs_seen == 0:  # the fit stopped inside the first epoch (max_steps, fast_dev_run)
            self._finish_first_epoch(pl_module)

    def _finish_first_epoch(self, pl_module: Any) -> None:
        if not self._inputs_done:
            self._judge_inputs()
        if not self._targets_done:
            self._judge_targets()
        if not self._labels_done:
            self._judge_labels(pl_module)
        self._train_hashing_done = True
        self._judge_overlap()

    # ---- validation batches ---------------------------------------------------------------------
    def on_validation_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int,
                                  dataloader_idx: int = 0) -> None:
        if self._overlap_done or self._val_complete or getattr(trainer, "sanity_checking", False):
            return
        if self._val_digests.full:
            return
        parts = self._parts(batch)
        if parts is not None and parts.inputs is not None:
            self._val_digests.add(sample_digests(parts.inputs, parts.mask, max_bytes=MAX_HASH_BYTES_PER_BATCH))

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if getattr(trainer, "sanity_checking", False) or self._overlap_done:
            return
        if len(self._val_digests):
            self._val_complete = True
        self._judge_overlap()

    # ---- rules ----------------------------------------------------------------------------------
    def _judge_inputs(self) -> None:
        self._inputs_done = True
        summary = self._moments.compute()
        self._moments = FeatureMoments()
        if summary is None:
            return
        channels = self._input_ndim >= 3 and summary["mean"].numel() <= 4  # images/signals: per-channel advice
        normalized_inside = None
        if self._first_layer is not None:
            name, first_summary, same = self._first_layer
            if not same and first_summary is not None and rules.normalized_in_model(first_summary):
                normalized_inside = name
        self.report_verdict(rules.inputs_not_normalized(summary, channels=channels, normalized_inside=normalized_inside))

    def _judge_targets(self) -> None:
        self._targets_done = True
        summary = self._target_moments.compute()
        self._target_moments = FeatureMoments()
        if summary is not None:
            self.report_verdict(rules.targets_not_normalized(summary))

    def _judge_labels(self, pl_module: Any) -> None:
        self._labels_done = True
        counted = self._labels.compute()
        self._labels = LabelCounts()
        if counted is None or counted["overflow"] or (counted["kind"] == "binary_float" and counted["other"]):
            return  # not class labels (soft/regression targets, or labels beyond the counted range)
        counts = counted["counts"]
        kind = counted["kind"]
        if kind == "binary_float":
            confirmed = True
        else:
            classes = self._context.get(signals.LOSS_NUM_CLASSES)
            width = classes if isinstance(classes, int) and classes >= 2 else self._last_linear_width
            confirmed = bool(width and width >= 2 and width >= len(counts))
        weighted = any(isinstance(m, _WEIGHTED_LOSSES) and (getattr(m, "weight", None) is not None
                                                            or getattr(m, "pos_weight", None) is not None)
                       for m in pl_module.modules()) if isinstance(pl_module, nn.Module) else False
        self.report_verdict(rules.class_imbalance(counts, kind, confirmed, weighted))
        self.report_verdict(rules.batches_not_shuffled(counts, counted["mean_distinct"], counted["batches"],
                                                       counted["mean_batch_size"]))

    def _training_set_size(self) -> Optional[float]:
        """Training samples per epoch on this process (to scale the share up from the hashed part), if known."""
        batches = getattr(self._trainer, "num_training_batches", None)
        if not self._samples_per_batch or not isinstance(batches, (int, float)) or not math.isfinite(batches) or batches <= 0:
            return None
        if self._hash_batches >= batches:
            return float(self._train_digests.samples)  # every training batch was hashed
        total = float(batches) * self._samples_per_batch
        try:
            loader = self._trainer.train_dataloader
            total = min(total, len(loader.dataset) / max(1, self.world_size()))
        except Exception:  # iterable datasets, combined loaders: the batch count is all we know
            pass
        return total

    def _judge_overlap(self) -> None:
        if self._overlap_done or not self._val_complete or not len(self._train_digests):
            return
        total = self._training_set_size()
        self.report_verdict(rules.train_val_overlap(self._train_digests.counts, self._train_digests.samples,
                                                    self._val_digests.counts, total))
        if self._train_hashing_done:
            self._overlap_done = True
            self._train_digests.clear()
            self._val_digests.clear()


    def _release(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
