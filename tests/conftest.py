"""Triton kernels run under the interpreter on a machine without CUDA. Triton decides at `@triton.jit` time
whether a kernel is interpreted, so this must happen before anything imports triton. On a GPU machine the
compiled kernels run (set TRITON_INTERPRET=1 yourself to interpret them there)."""
import os
import shutil

if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")



def pytest_terminal_summary(terminalreporter):
    """Says when this Triton's interpreter cannot run the kernel tests here (they fail), and the fix."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        from dyllm_fx.kernels.dispatch import _interpreter_problem

        problem = _interpreter_problem()
        if problem:
            terminalreporter.write_line(f"the Triton kernel tests cannot pass here: {problem}", red=True)
