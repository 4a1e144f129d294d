import os
import warnings

import pytest
import torch

# Two cores on CI: one intra-op thread per test process keeps fits fast, repeatable and bitwise comparable.
torch.set_num_threads(1)
os.environ.setdefault("PL_DISABLE_FORK", "1")
warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*GPU available but not used.*")


def pytest_addoption(parser):
    parser.addoption("--fuzz-examples", type=int, default=None,
                     help="how many random configurations the fuzz test runs (default: DIAG_FUZZ_EXAMPLES or a small CI setting)")


@pytest.fixture
def fuzz_examples(request):
    value = request.config.getoption("--fuzz-examples")
    if value is None:
        value = int(os.environ.get("DIAG_FUZZ_EXAMPLES", "0")) or None
    return value
