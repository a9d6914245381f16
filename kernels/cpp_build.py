"""Builds our CPU kernels' C++ (`panel_gemm.py`, `attention_step_cpp.py`) with Inductor's C++ toolchain.

`load(name, argtypes, source, fallback)` compiles `source`, whose `extern "C" void kernel(...)` takes `argtypes`,
once per process (Inductor also caches the library on disk) and returns it as a Python callable: a tensor for
each pointer type, an int for `int64_t` and `uintptr_t`, a float for `float`. `at::vec::Vectorized` in the source
picks the machine's vector ISA, and `#pragma omp` runs on Inductor's OpenMP threads.
Where it cannot be built (no C++ compiler, an Inductor without this API) it warns once, naming `fallback` (what
callers run instead), and returns None.
"""
import warnings
from typing import Callable, Optional, Sequence

_BUILT: dict[str, Optional[Callable]] = {}  # kernel name -> the callable, or None where the build failed


def load(name: str, argtypes: Sequence[str], source: str, fallback: str) -> Optional[Callable]:
    """The compiled kernel, or None (one warning per kernel) where it cannot be built."""
    if name not in _BUILT:
        try:
            from torch._inductor.codecache import CppPythonBindingsCodeCache

            _BUILT[name] = CppPythonBindingsCodeCache.load_pybinding(list(argtypes), source)
        except Exception as e:
            warnings.warn(f"dyllm: the CPU kernel {name} could not be compiled ({type(e).__name__}: {e}); "
                          f"{fallback} instead (slower). Inductor's CPU backend needs a C++ compiler.")
            _BUILT[name] = None
    return _BUILT[name]


def built(name: str) -> bool:
    """Whether `load` was called for `name` in this process (whatever its outcome)."""
    return name in _BUILT


def forget(name: str) -> None:
    """Drop `name`'s kernel: the next `load` builds it again (tests)."""
    _BUILT.pop(name, None)
