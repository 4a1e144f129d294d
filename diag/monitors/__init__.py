"""The monitors: which statistics to take on which step, which rules to run on them, and what to report.

Nothing here imports Lightning. ``diag.callbacks`` makes each monitor a Lightning ``Callback``; ``diag.watch``
drives the same monitors from a plain PyTorch or Fabric loop.
"""

from .activations import ActivationMonitor
from .base import Monitor
from .data import DataMonitor
from .fit import FitMonitor
from .gradients import GradientMonitor
from .loss_curve import LossCurveMonitor
from .lr_probe import LearningRateProbe
from .setup_check import SetupCheck

__all__ = ["Monitor", "LossCurveMonitor", "LearningRateProbe", "GradientMonitor", "ActivationMonitor", "FitMonitor",
           "SetupCheck", "DataMonitor"]
