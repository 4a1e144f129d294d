"""Lightning callbacks of lightning-diag; work with ``pytorch_lightning`` and ``lightning.pytorch`` Trainers alike.

Example::

    from diag.callbacks import Diagnostics
    trainer = pl.Trainer(callbacks=[Diagnostics()])
"""

from .activations import ActivationMonitor
from .base import Monitor
from .data import DataMonitor
from .diagnostics import Diagnostics
from .fit import FitMonitor
from .gradients import GradientMonitor
from .loss_curve import LossCurveMonitor
from .lr_probe import LearningRateProbe
from .setup_check import SetupCheck

__all__ = ["Diagnostics", "Monitor", "LossCurveMonitor", "LearningRateProbe", "GradientMonitor",
           "ActivationMonitor", "FitMonitor", "SetupCheck", "DataMonitor"]
