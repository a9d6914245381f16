"""`dot`: `tl.dot` in IEEE fp32 when asked (fp32 inputs: `tau = 1.0` must stay exact; Triton's default is TF32),
the default precision otherwise. Shared by the Triton kernels."""
import triton
import triton.language as tl


@triton.jit
def dot(a, b, IEEE: tl.constexpr):
    if IEEE:
        out = tl.dot(a, b, input_precision="ieee")
    else:
        out = tl.dot(a, b)
    return out
