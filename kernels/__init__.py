"""Custom ops on rows (`torch.ops.dyllm.*`): each with a fake impl and a plain-torch reference."""
if __name__ == "dyllm_fx.kernels":
    from . import attention_step_cpp  # noqa: F401  (registers torch.ops.dyllm.attention_step)
    from .compact_rows import select_rows
    from .delta_attention import delta_attention
    from . import packed_linear  # noqa: F401  (registers torch.ops.dyllm.packed_linear)
    from . import direct_calls  # noqa: F401  (Inductor's wrapper calls the three above without the dispatcher)
    from .row_update import row_update_
    from .sparse_rows_linear import sparse_rows_linear

    __all__ = ["delta_attention", "row_update_", "select_rows", "sparse_rows_linear"]
else:
    # Imported as a top-level `kernels`: the repository root is on sys.path (`python -m ...` or `python -c` run
    # from it), and this folder shadows Hugging Face's `kernels` package, which transformers imports (a dependency
    # of transformers >= 5.25). The ops are registered under `dyllm_fx.kernels` alone; under this name the import
    # loads that package from the rest of sys.path instead, or fails as it would without this folder.
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _spec = importlib.machinery.PathFinder.find_spec(
        __name__, [p for p in sys.path if os.path.abspath(p or os.curdir) != _root])
    if _spec is None:
        raise ModuleNotFoundError(f"No module named {__name__!r}", name=__name__)
    _module = importlib.util.module_from_spec(_spec)
    sys.modules[__name__] = _module  # what this import returns (the import system reads it back from sys.modules)
    _spec.loader.exec_module(_module)
