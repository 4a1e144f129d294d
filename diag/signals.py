"""Names of the measurements monitors publish on the shared :class:`~diag.context.DiagContext`.

Each constant says who publishes it and what the value is. A reader must cope with a missing key
(the publishing monitor may be switched off, or not have seen enough steps yet).
"""

# LossCurveMonitor ------------------------------------------------------------------------------
LOSS_SMOOTHED = "loss/smoothed"  # float: bias-corrected EMA (decay 0.95) of the training loss, one value per optimizer step; updated every 10 steps
LOSS_INITIAL = "loss/initial"  # float: the first finite training loss seen (the loss at init unless the fit was resumed/fine-tuned)
LOSS_BEST = "loss/best"  # float: the lowest smoothed training loss so far
LOSS_CHANCE_LEVEL = "loss/chance_level"  # float: ln C for a C-class classifier, when C is known
LOSS_RELATIVE_PROGRESS = "loss/relative_progress"  # float: relative drop from the median of the older half to the median of the newer half of the last 50 raw losses (0.1 = fell 10%; negative = rose)
LOSS_STALLED = "loss/stalled"  # bool: past the warm-up (40 steps) and LOSS_RELATIVE_PROGRESS < 0.02. Also True for a converged run: compare LOSS_SMOOTHED with LOSS_INITIAL / LOSS_CHANCE_LEVEL to tell "stuck high" from "done"
LOSS_NUM_CLASSES = "loss/num_classes"  # int: the class count inferred (or given) for classification

# FitMonitor ------------------------------------------------------------------------------------
FIT_EVALUATION = "fit/evaluation"  # (step, train, val): the last evaluation, when its validation metric is a loss and the training figure the mean training loss since the previous one (both finite)

# GradientMonitor -------------------------------------------------------------------------------
GRAD_ZIGZAG = "gradients/zigzag"  # bool: consecutive updates persistently point in opposite directions
GRAD_TINY = "gradients/tiny"  # bool: gradient norms are tiny relative to the weights (plateau / saddle evidence)
GRAD_UPDATE_TO_WEIGHT_RATIO = "gradients/update_to_weight_ratio"  # float: median over layers of |dW|/|W|
GRAD_EXTRA_PASS = "gradients/extra_pass"  # bool: True while GradientMonitor re-runs training_step on half a batch (noise scale); forward hooks may skip it

# LearningRateProbe -----------------------------------------------------------------------------
PROBE_VERDICT = "probe/verdict"  # str: "lr_too_high" | "lr_too_low" | "suspected_code_bug" | "lr_ok"
PROBE_SUGGESTED_LR = "probe/suggested_lr"  # float: the learning rate the probe suggests
PROBE_RUNNING = "probe/running"  # bool: True while the probe trains throw-away copies (forward/backward passes that are
#                                  not the user's training: monitors with forward or tensor hooks should ignore them)

# DataMonitor -----------------------------------------------------------------------------------
BATCH_SIZE = "data/batch_size"  # int: samples in a training batch (per device)
