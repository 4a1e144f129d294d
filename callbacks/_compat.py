"""One callback base class that both ``pytorch_lightning`` and ``lightning.pytorch`` Trainers accept.

The two packages ship identical but distinct ``Callback`` classes, and each Trainer rejects the other's.
Our base derives from every one that is installed, so ``from diag.callbacks import Diagnostics`` works
with either ``import pytorch_lightning as pl`` or ``import lightning.pytorch as pl``.
"""

from __future__ import annotations

from typing import Any, List, Tuple, Type

_bases: List[type] = []
_tensorboard_loggers: List[type] = []

try:
    import pytorch_lightning as _pl

    _bases.append(_pl.Callback)
    _tensorboard_loggers.append(_pl.loggers.TensorBoardLogger)
except ImportError:  # pragma: no cover - depends on what the user installed
    pass
try:
    import lightning.pytorch as _lpl

    _bases.append(_lpl.Callback)
    _tensorboard_loggers.append(_lpl.loggers.TensorBoardLogger)
except ImportError:  # pragma: no cover
    pass

if not _bases:  # pragma: no cover
    raise ImportError(
        "diag.callbacks needs PyTorch Lightning: `pip install pytorch-lightning` (or `pip install lightning`). "
        "The rest of `diag` works without it."
    )

CALLBACK_BASES: Tuple[type, ...] = tuple(_bases)
TENSORBOARD_LOGGERS: Tuple[Type[Any], ...] = tuple(_tensorboard_loggers)


def is_tensorboard_logger(logger: Any) -> bool:
    return isinstance(logger, TENSORBOARD_LOGGERS)


def rank_zero_log(message: str, level: str = "info") -> None:
    """Log through the ``diag`` logger (our sinks already live on global rank zero only)."""
    import logging

    getattr(logging.getLogger("diag"), level)(message)
