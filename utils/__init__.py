"""Helper package of the Circuits by Example course: the reference code the chapters build."""

import os

import torch

# The course's models are tiny. One thread trains them as fast as two on an idle laptop and
# stays fast when anything else is busy: measured here, two OpenMP threads sharing 2 cores with
# one other busy process ran 25x slower. Set CIRCUITS_TORCH_THREADS to override.
torch.set_num_threads(int(os.environ.get("CIRCUITS_TORCH_THREADS", "1")))
