"""Numeric precision: fp32 (exact equivalence tests) or bf16 compute with fp32 master weights.

bf16 mode follows mixed-precision training (Micikevicius et al. 2018, "Mixed Precision
Training", Sec. 3.1) as Megatron-LM runs bf16 (no loss scaling: bf16 has fp32's exponent range,
Kalamkar et al. 2019):

- the model's parameters are cast to bf16: this is the compute copy, so activations, pipeline
  messages and tensor-parallel collectives are bf16 (half the bytes);
- the optimizer (`modelpar.runtime.zero.ZeroOneAdamW`, sharded over the data group or not) keeps
  fp32 master weights and fp32 Adam moments, steps them with the gradients converted to fp32,
  and writes the result back into the bf16 parameters;
- the data-parallel reduction runs in fp32 buckets (`GradientReducer`);
- the loss (cross-entropy over fp32 logits in the model's head) is fp32.

Simplification against Megatron: the gradients of the m micro-batches accumulate in the bf16
`.grad` (Megatron accumulates into an fp32 `main_grad`); this keeps every gradient hook of the
tensor- and sequence-parallel layers working on `.grad`. The same recipe runs on CPU and GPU (a
bf16 model copy with an fp32 master); on CUDA one could instead keep fp32 parameters under
`torch.autocast`, which saves no parameter memory.

Order matters: the optimizer must capture the fp32 master weights *before* `cast_model`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from modelpar.specs.errors import SpecError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class PrecisionPolicy:
    """'fp32': everything fp32. 'bf16': bf16 parameters, activations and gradients; fp32 master
    weights, optimizer states, data-parallel reduction and loss."""

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
