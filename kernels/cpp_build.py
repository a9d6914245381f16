"""Builds our CPU kernels' C++ (`panel_gemm.py`, `attention_step_cpp.py`) with Inductor's C++ toolchain.

`load(name, argtypes, source, fallback, variant)` compiles `source`, whose `extern "C" void kernel(...)` takes
`argtypes`, once per process and `variant` (a kernel built per head dim passes the head dim; Inductor also caches
the library on disk), and returns it as a Python callable: a tensor for each pointer type, an int for `int64_t`
and `uintptr_t`, a float for `float`. `at::vec::Vectorized` in the source picks the machine's vector ISA, and
`#pragma omp` runs on Inductor's OpenMP threads.
Where it cannot be built (no C++ compiler, an Inductor without this API) it warns once, naming `fallback` (what
callers run instead), and returns None.
"""
import warnings
from typing import Callable, Optional, Sequence

_BUILT: dict[tuple, Optional[Callable]] = {}  # (kernel name, variant) -> the callable, or None where the build failed


def load(name: str, argtypes: Sequence[str], source: str, fallback: str, variant=None) -> Optional[Callable]:
    """The compiled kernel, or None (one warning per kernel and variant) where it cannot be built."""
    key = (name, variant)
    if key not in _BUILT:
        try:
            from torch._inductor.codecache import CppPythonBindingsCodeCache

            _BUILT[key] = CppPythonBindingsCodeCache.load_pybinding(list(argtypes), source)
        except Exception as e:
            warnings.warn(f"dyllm: the CPU kernel {name} could not be compiled ({type(e).__name__}: {e}); "
                          f"{fallback} instead (slower). Inductor's CPU backend needs a C++ compiler.")
            _BUILT[key] = None
    return _BUILT[key]


def built(name: str) -> bool:
    """Whether `load` was called for `name` (any variant) in this process (whatever its outcome)."""
    return any(key[0] == name for key in _BUILT)


def forget(name: str) -> None:
    """Drop `name`'s kernels (every variant): the next `load` builds them again (tests)."""
    for key in [key for key in _BUILT if key[0] == name]:
        del _BUILT[key]
