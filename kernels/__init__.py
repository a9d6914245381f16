"""Custom ops on rows: each with a fake impl, a plain-torch reference and (on GPU) a Triton kernel."""
