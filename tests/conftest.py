"""Test-wide settings: one intra-op thread per test process.

The suite runs with ``pytest -n 2`` on 2 cores; letting every worker spawn a thread per
core oversubscribes the CPU, and tiny matmuls then spend most of their time spinning
(measured 10x slower under load).
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(1)
