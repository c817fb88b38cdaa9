"""Session set-up shared by every test module."""

import os

import torch

# Triton decides at import whether its kernels run interpreted. Without a GPU the triton backend
# is tested on CPU tensors through the interpreter; with one, on CUDA tensors, compiled.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
