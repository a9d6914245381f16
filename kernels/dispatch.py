"""When the ops run their Triton kernels instead of the plain-torch reference.

On CUDA the Triton kernels run (JIT). On CPU the reference runs: it selects the rows with a data-dependent
`nonzero`, so the matmuls really shrink with the row count. `triton_on_cpu(True)` routes CPU tensors through
the Triton kernels too, for testing them under the interpreter (`TRITON_INTERPRET=1` must be set before
`triton` is first imported: Triton decides at `@triton.jit` time whether a kernel is interpreted), in eager
calls only: an interpreted kernel cannot take the fake tensors of a trace, so a traced CPU call takes the reference.

Every launch is `wrap_triton(kernel)[grid](...)`: called eagerly it runs the kernel; traced inside a `triton_op`
it records the kernel for Inductor.
"""
import contextlib
import os

from torch._subclasses.fake_tensor import is_fake

_TRITON_ON_CPU = False


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")


def use_triton(t) -> bool:
    if t.device.type == "cuda":
        return True
    return _TRITON_ON_CPU and t.device.type == "cpu" and not is_fake(t)


@contextlib.contextmanager
def triton_on_cpu(enabled: bool = True):
    """Runs the ops' Triton kernels on CPU tensors (needs `TRITON_INTERPRET=1` set before importing triton)."""
    global _TRITON_ON_CPU
    if enabled and not interpreted():
        raise RuntimeError("triton_on_cpu needs the Triton interpreter: set TRITON_INTERPRET=1 in the environment "
                           "before importing torch/triton")
    previous, _TRITON_ON_CPU = _TRITON_ON_CPU, enabled
    try:
        yield
    finally:
        _TRITON_ON_CPU = previous
