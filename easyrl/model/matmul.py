"""The dense layers' matmul: `dense_matmul` (x @ W with its own VJP) and `dense_dot_general`,
the `dot_general` that `nn.Dense` (`llama.dense_module`) and `lora.LoRADense` route x @ W through."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from easyrl.platform_tuning import wgrad_operands

DENSE_OUT = "dense_out"  # checkpoint name of every dense layer's output (`dense_matmul`)


def dense_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """`lax.dot_general` for the dense layers (`nn.Dense(dot_general=...)`, `LoRADense`).

    x [..., K] @ W [K, N] goes through `dense_matmul`; anything else takes the plain dot."""
    (lc, rc), (lb, rb) = dimension_numbers
    if (rhs.ndim == 2 and rhs.dtype == lhs.dtype and tuple(lc) == (lhs.ndim - 1,)
            and tuple(rc) == (0,) and not lb and not rb and precision is None
            and preferred_element_type in (None, lhs.dtype)
            and lhs.dtype in (jnp.float32, jnp.bfloat16, jnp.float16)):
        return checkpoint_name(dense_matmul(lhs, rhs), DENSE_OUT)
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type)


def _acc(dtype):
    return jnp.float32 if dtype in (jnp.bfloat16, jnp.float16) else None


@jax.custom_vjp
def dense_matmul(x, w):
    """x [..., K] @ w [K, N] -> [..., N] in x's dtype; the same numbers as `x @ w`, with a
    hand-written backward pass for two reasons, both measured on XLA:CPU (benchmarks/RESULTS.md):

    - bf16/f16 compute: every dot (forward, d x, d W) takes low-precision operands and
      accumulates in float32, rounding once. Autodiff of a float32-accumulating dot would feed the
      backward dots the float32 cotangent and run them in float32; and a bf16 x bf16 -> bf16 dot
      is upcast to a float32 one on XLA:CPU, while bf16 x bf16 -> f32 runs on the AMX/AVX512-BF16
      kernels (950 vs 230 GFLOP/s at 2048^3). bench_100m train step: 10.2 s -> 5.4 s.
    - on CPU the weight-gradient dot's operands pass an optimization barrier first, so XLA does
      not fuse the producers of the cotangent (the SwiGLU backward, the residual adds) into
      transposed-layout loops feeding the dot, which ran at a fraction of memory speed:
      float32 bench_100m train step 10.6 s -> 9.3 s. Other backends fuse freely. Which platforms
      take it: `platform_tuning.Tuning.wgrad_barrier`, picked when the computation is lowered
      (`platform_tuning.wgrad_operands`).
    """
    return jnp.einsum("...k,kn->...n", x, w, preferred_element_type=_acc(x.dtype)).astype(x.dtype)


def _dense_matmul_fwd(x, w):
    return dense_matmul(x, w), (x, w)


def _dense_matmul_bwd(res, g):
    x, w = res
    acc = _acc(x.dtype)
    g = g.astype(x.dtype)
    dx = jnp.einsum("...n,kn->...k", g, w, preferred_element_type=acc).astype(x.dtype)
    x, g = wgrad_operands(x, g)  # an optimization barrier on CPU (see the docstring)
    if x.ndim >= 3:  # keep one leading batch axis: XLA:CPU runs a [B, T]-contracting bf16 dot
        xs = x.reshape(x.shape[0], -1, x.shape[-1])  # on its fast kernels, a [B*T] one not
        gs = g.reshape(g.shape[0], -1, g.shape[-1])
        dw = jnp.einsum("btk,btn->kn", xs, gs, preferred_element_type=acc)
    else:
        dw = jnp.einsum("tk,tn->kn", x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1]),
                        preferred_element_type=acc)
    return dx, dw.astype(w.dtype)


dense_matmul.defvjp(_dense_matmul_fwd, _dense_matmul_bwd)
