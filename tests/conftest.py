"""Triton kernels run under the interpreter on a machine without CUDA. Triton decides at `@triton.jit` time
whether a kernel is interpreted, so this must happen before anything imports triton. On a GPU machine the
compiled kernels run (set TRITON_INTERPRET=1 yourself to interpret them there)."""
import os
import shutil

if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")
