"""lightning-diag: watches a training run and says what is wrong and what to do.

``diag`` holds everything that does not need Lightning (findings, statistics, rules, sinks); the Lightning
callbacks live in :mod:`diag.callbacks`.
"""

import logging as _logging

from diag.codes import CATALOGUE, CodeInfo, code_info
from diag.collector import FindingsCollector
from diag.context import DiagContext
from diag.findings import Finding, Severity
from diag.watch import watch

__version__ = "0.1.0"
__all__ = ["Finding", "Severity", "CATALOGUE", "CodeInfo", "code_info", "FindingsCollector", "DiagContext", "watch"]

# Like Lightning's own loggers: print INFO and above to stderr unless the application configured logging.
_log = _logging.getLogger(__name__)
if not _logging.getLogger().hasHandlers() and not _log.handlers:
    _log.setLevel(_logging.INFO)
    _log.addHandler(_logging.StreamHandler())
    _log.propagate = False
