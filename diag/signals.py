"""Names of the measurements monitors publish on the shared :class:`~diag.context.DiagContext`.

Each constant says who publishes it and what the value is. A reader must cope with a missing key
(the publishing monitor may be switched off, or not have seen enough steps yet).
"""

# LossCurveMonitor ------------------------------------------------------------------------------
LOSS_SMOOTHED = "loss/smoothed"  # float: bias-corrected EMA of the training loss (per optimizer step)
LOSS_INITIAL = "loss/initial"  # float: the first training loss seen
LOSS_BEST = "loss/best"  # float: the lowest smoothed training loss so far
LOSS_CHANCE_LEVEL = "loss/chance_level"  # float: ln C for a C-class classifier, when C is known
LOSS_RELATIVE_PROGRESS = "loss/relative_progress"  # float: relative drop of the smoothed loss over the recent window (0.1 = fell 10%)
LOSS_STALLED = "loss/stalled"  # bool: the smoothed loss has made (almost) no progress over the recent window
LOSS_NUM_CLASSES = "loss/num_classes"  # int: the class count inferred (or given) for classification

# GradientMonitor -------------------------------------------------------------------------------
GRAD_ZIGZAG = "gradients/zigzag"  # bool: consecutive updates persistently point in opposite directions
GRAD_TINY = "gradients/tiny"  # bool: gradient norms are tiny relative to the weights (plateau / saddle evidence)
GRAD_UPDATE_TO_WEIGHT_RATIO = "gradients/update_to_weight_ratio"  # float: median over layers of |dW|/|W|

# LearningRateProbe -----------------------------------------------------------------------------
PROBE_VERDICT = "probe/verdict"  # str: "lr_too_high" | "lr_too_low" | "suspected_code_bug" | "lr_ok"
PROBE_SUGGESTED_LR = "probe/suggested_lr"  # float: the learning rate the probe suggests

# DataMonitor -----------------------------------------------------------------------------------
BATCH_SIZE = "data/batch_size"  # int: samples in a training batch (per device)
