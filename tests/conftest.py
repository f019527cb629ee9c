import os

import pytest

# Spinning OpenMP threads slow every torch process down several-fold when the suite's own servers and
# subprocesses share the two CI cores; see qformer/cli.py.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@pytest.fixture(autouse=True)
def _denormals_back_on():
    """Training turns on flush-to-zero for denormal floats (they slow CPU steps down many-fold); that is
    process-wide, and Hypothesis refuses to draw floats under it. Each test starts with the default."""
    yield
    import torch

    torch.set_flush_denormal(False)
