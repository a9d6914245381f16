"""When the ops run their Triton kernels instead of the plain-torch reference.

On CUDA the Triton kernels run (JIT). On CPU the reference runs: it selects the rows with a data-dependent
`nonzero`, so the matmuls really shrink with the row count. `triton_on_cpu(True)` routes CPU tensors through
the Triton kernels too, for testing them under the interpreter (`TRITON_INTERPRET=1` must be set before
`triton` is first imported: Triton decides at `@triton.jit` time whether a kernel is interpreted), in eager
calls only: an interpreted kernel cannot take the fake tensors of a trace, so a traced CPU call takes the reference.

Every launch is `launch(kernel)[grid](...)`, that is `wrap_triton(kernel)[grid](...)`: called eagerly it runs the
kernel; traced inside a `triton_op` it records the kernel for Inductor.
"""
import contextlib
import os

from torch._subclasses.fake_tensor import is_fake
from torch.library import wrap_triton

_TRITON_ON_CPU = False


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")


def launch(kernel):
    """`wrap_triton(kernel)`, or the kernel itself where the interpreter made it (`TRITON_INTERPRET=1`): such a
    kernel only runs eagerly, and torch before 2.13 refuses it in `wrap_triton`."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    jitted = kernel.fn if isinstance(kernel, Autotuner) else kernel
    return wrap_triton(kernel) if isinstance(jitted, JITFunction) else kernel


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
    problem = _interpreter_problem() if enabled else None
    if problem:
        raise RuntimeError(problem)
    previous, _TRITON_ON_CPU = _TRITON_ON_CPU, enabled
    try:
        yield
    finally:
        _TRITON_ON_CPU = previous


def _interpreter_problem():
    """Why this Triton's interpreter cannot run our kernels here, or None. Triton before 3.7 (torch 2.11 pins
    3.6) turns a 1-element array into an int with `int()`, which NumPy 2.4 refuses."""
    import numpy
    import triton

    def version(v: str) -> tuple:
        return tuple(int(p) for p in v.split("+")[0].split(".")[:2])

    if version(triton.__version__) < (3, 7) and version(numpy.__version__) >= (2, 4):
        return (f"Triton {triton.__version__}'s interpreter cannot run with NumPy {numpy.__version__} (it calls int() "
                "on 1-element arrays, which NumPy 2.4 refuses): pip install 'numpy<2.4', or Triton >= 3.7")
    return None
