"""Custom ops on rows (`torch.ops.dyllm.*`): each with a fake impl and a plain-torch reference."""
from .delta_attention import delta_attention
from .row_update import row_update_
from .sparse_rows_linear import sparse_rows_linear

__all__ = ["delta_attention", "row_update_", "sparse_rows_linear"]
