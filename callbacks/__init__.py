"""Lightning callbacks of lightning-diag; work with ``pytorch_lightning`` and ``lightning.pytorch`` Trainers alike.

Example::

    from diag.callbacks import Diagnostics
    trainer = pl.Trainer(callbacks=[Diagnostics()])
"""

from .base import Monitor
from .diagnostics import Diagnostics
from .monitors import (ActivationMonitor, DataMonitor, FitMonitor, GradientMonitor, LearningRateProbe, LossCurveMonitor,
                       SetupCheck)

__all__ = ["Diagnostics", "Monitor", "LossCurveMonitor", "LearningRateProbe", "GradientMonitor",
           "ActivationMonitor", "FitMonitor", "SetupCheck", "DataMonitor"]
