"""Numeric precision: fp32 (exact equivalence tests) or bf16 compute with fp32 master weights.

bf16 mode follows mixed-precision training (Micikevicius et al. 2018, "Mixed Precision
Training", Sec. 3.1) as Megatron-LM runs bf16 (no loss scaling: bf16 has fp32's exponent range,
Kalamkar et al. 2019):

- the model's parameters are cast to bf16: this is the compute copy, so activations, pipeline
  messages and tensor-parallel collectives are bf16 (half the bytes);
- the optimizer (`modelpar.runtime.zero.ZeroOneAdamW`, sharded over the data group or not) keeps
  fp32 master weights and fp32 Adam moments, steps them with the gradients converted to fp32,
  and writes the result back into the bf16 parameters;
- gradients accumulate in fp32 *main gradients* (`MainGradients`; Megatron-LM's ``main_grad``
  with ``accumulate_allreduce_grads_in_fp32``): after each micro-batch's backward, a hook adds the
  parameter's bf16 ``.grad`` into its fp32 ``param.main_grad`` and clears ``.grad``, so the m
  micro-batches of a step are summed in fp32 rather than rounded to bf16 after every addition;
- the data-parallel reduction (`GradientReducer`, ZeRO-1's reduce-scatter), the tensor-parallel
  gradient syncs, the gradient norm and clipping all read and write the fp32 main gradient
  (`data_parallel.default_grad_of` picks ``main_grad`` whenever a parameter has one), and the
  fp32 master weights are stepped from it;
- the loss (cross-entropy over fp32 logits in the model's head) is fp32.

Each micro-batch's own gradient is still computed in bf16 (its weight-gradient GEMMs write bf16);
Megatron's gradient-accumulation fusion writes those GEMMs straight into ``main_grad`` in fp32,
which needs fused kernels. The same recipe runs on CPU and GPU (a bf16 model copy with an fp32
master); on CUDA one could instead keep fp32 parameters under `torch.autocast`, which saves no
parameter memory. Memory: 4 bytes of main gradient per parameter, as the planner counts.

Checkpoints save the fp32 master weights (`ZeroOneAdamW.master_weights`, `runtime.checkpoint`)
beside the bf16 copy; a resumed run builds its model from them, so the optimizer captures the
saved master weights, not the rounded copy.

Order matters: the optimizer must capture the fp32 master weights *before* `cast_model`, and
`MainGradients` must register its hooks *before* a `GradientReducer` registers its own (hooks run
in registration order; the reducer must see the micro-batch already added to ``main_grad``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from modelpar.runtime.data_parallel import MAIN_GRAD
from modelpar.specs.errors import SpecError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class PrecisionPolicy:
    """'fp32': everything fp32. 'bf16': bf16 parameters, activations and per-micro-batch
    gradients; fp32 main gradients (accumulation), master weights, optimizer states,
    data-parallel reduction and loss."""

    dtype: str = "fp32"

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise SpecError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")

    @property
    def compute_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def mixed(self) -> bool:
        """True when the model computes in a lower precision than its fp32 master weights."""
        return self.dtype != "fp32"

    def cast_model(self, module: nn.Module) -> None:
        """Cast parameters and floating buffers to the compute dtype, in place (parameter objects,
        hence optimizer and hook references, are kept)."""
        if self.mixed:
            module.to(self.compute_dtype)

    def loss_for_backward(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss in fp32."""
        return loss.float()


class MainGradients:
    """fp32 gradient accumulation for a low-precision model: ``param.main_grad``.

    For every parameter a post-accumulate-grad hook runs after each backward pass that reached it:
    ``main_grad += grad.float()`` (or ``main_grad = grad.float()`` on the first micro-batch of the
    step), then ``grad = None``. A parameter used twice in one backward (tied embeddings on one
    stage) gets one hook call with autograd's sum of its uses. `zero` resets every main gradient to
    None (the optimizers' `zero_grad` does the same). While a parameter has the attribute, the
    gradient readers of this runtime use it instead of ``.grad``.
    """

    def __init__(self, params) -> None:
        unique = {id(param): param for param in params if param.requires_grad}
        self.params = list(unique.values())
        self._handles = []
        for param in self.params:
            setattr(param, MAIN_GRAD, None)
            self._handles.append(param.register_post_accumulate_grad_hook(_accumulate_main_grad))

    @torch.no_grad()
    def zero(self) -> None:
        for param in self.params:
            setattr(param, MAIN_GRAD, None)

    def remove(self) -> None:
        """Remove the hooks and the attribute (the parameters go back to plain ``.grad``)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for param in self.params:
            if hasattr(param, MAIN_GRAD):
                delattr(param, MAIN_GRAD)


@torch.no_grad()
def _accumulate_main_grad(param: torch.Tensor) -> None:
    grad = param.grad
    if grad is None:
        return
    main = getattr(param, MAIN_GRAD)
    if main is None:
        setattr(param, MAIN_GRAD, grad.to(torch.float32, copy=True))
    else:
        main.add_(grad)
    param.grad = None
