import os

# Spinning OpenMP threads slow every torch process down several-fold when the suite's own servers and
# subprocesses share the two CI cores; see qformer/cli.py.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
