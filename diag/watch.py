"""``diag.watch``: lightning-diag in a plain PyTorch or Fabric training loop.

This module does not import Lightning: the session (:mod:`diag.callbacks.session`) is imported when ``watch`` is
called. It drives the same monitors as the Lightning callback ``Diagnostics``, so a plain loop gets the same findings,
files and guarantees; the monitors are Lightning callbacks, so ``pytorch-lightning`` (or ``lightning``) must be
installed, as it is with ``pip install lightning-diag``.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Callable, Optional, Union

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from diag.callbacks.session import WatchSession


def watch(model: "torch.nn.Module", optimizer: "torch.optim.Optimizer", *,
          loss_fn: Optional[Callable[["torch.nn.Module", Any], Any]] = None,
          log_dir: Optional[Union[str, "os.PathLike[str]"]] = None, fabric: Any = None,
          **options: Any) -> "WatchSession":
    """Watch a plain PyTorch (or Fabric) training loop; the loop calls ``session.step(loss, batch)`` once per iteration.

    The session sees the loop through hooks it registers itself: a forward pre-hook on the model (to arm the sampled
    measurements before the forward) and step pre/post hooks on the optimizer (gradients and updates, the global step).
    Nothing else in the loop changes, and training is bitwise the same with and without it.

    Args:
        model: the ``nn.Module`` being trained (Fabric's wrapper from ``fabric.setup`` is fine).
        optimizer: its ``torch.optim.Optimizer`` (Fabric's wrapper is fine).
        loss_fn: ``loss_fn(model, batch) -> loss``, the loss the loop computes; enables the learning-rate probe, which
            trains throw-away steps of the model on part of a batch and restores everything. Without it the probe says
            once (at ``info``) why it cannot run.
        log_dir: where ``diag/findings.jsonl`` and the TensorBoard events (``diag/...`` scalars, the ``diag/findings``
            table, the custom-scalars layout) go. ``None``: findings reach ``session.findings`` and the console only.
        fabric: the ``lightning.fabric.Fabric`` running the loop: statistics are reduced through it across processes
            and only global rank zero writes.
        **options: ``total_steps``: the optimizer steps the loop will take, if known (the learning-rate probe's time
            budget is a share of the whole run, as in a Trainer; unknown, it is a share of the time so far);
            ``resume``: a ``session.state_dict()`` saved with a checkpoint (the findings are kept, not repeated); and the
            options of :class:`diag.callbacks.Diagnostics` (``loss_curve``, ``lr_probe``, ``gradients``,
            ``activations``, ``fit``, ``setup_check``, ``data``, ``console``, ``jsonl``, ``tensorboard``). The fit
            monitor is off by default (it needs validation losses) and the gradient noise scale is not measured.

    Returns:
        The session: ``session.step(loss, batch)``, ``session.findings``, ``session.close()``; also a context manager.

    Example::

        import diag
        with diag.watch(model, optimizer, loss_fn=loss_fn, log_dir="runs/exp1") as session:
            for batch in loader:
                loss = loss_fn(model, batch)
                optimizer.zero_grad(); loss.backward(); optimizer.step()
                session.step(loss, batch)
        print(session.findings)
    """
    from diag.callbacks.session import WatchSession

    return WatchSession(model, optimizer, loss_fn=loss_fn, log_dir=log_dir, fabric=fabric, **options)
