"""Custom ops on rows (`torch.ops.dyllm.*`): each with a fake impl and a plain-torch reference."""
# From the repository root (cwd on sys.path) this folder is also importable as a top-level `kernels`, the name
# transformers probes for Hugging Face's `kernels` package. The ops are registered only under `dyllm_fx.kernels`,
# so that they are defined once, and such a probe finds an inert module without a version.
if __name__ == "dyllm_fx.kernels":
    from .compact_rows import select_rows
    from .delta_attention import delta_attention
    from . import packed_linear  # noqa: F401  (registers torch.ops.dyllm.packed_linear)
    from .row_update import row_update_
    from .sparse_rows_linear import sparse_rows_linear

    __all__ = ["delta_attention", "row_update_", "select_rows", "sparse_rows_linear"]
