"""`runtime.pipeline.deallocate_output_data`: a sent stage output's values are freed and the
backward pass from it with the received gradient still gives the same gradients."""

from __future__ import annotations

import torch
from torch import nn

from modelpar.runtime.pipeline import deallocate_output_data


def _stage(x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    return x + layer(torch.tanh(x))  # residual: the last op does not save its output


def test_backward_after_deallocation_gives_the_same_gradients():
    torch.manual_seed(0)
    layer = nn.Linear(8, 8)
    x = torch.randn(2, 5, 8)
    grad = torch.randn(2, 5, 8)

    x_kept = x.clone().requires_grad_()
    torch.autograd.backward(_stage(x_kept, layer), grad_tensors=grad)
    want_input, want_weight = x_kept.grad.clone(), layer.weight.grad.clone()
    layer.zero_grad()

    x_freed = x.clone().requires_grad_()
    output = _stage(x_freed, layer)
    deallocate_output_data(output)
    assert output.untyped_storage().nbytes() == output.element_size()
    assert output.shape == (2, 5, 8)
    torch.autograd.backward(output, grad_tensors=grad)
    assert torch.equal(x_freed.grad, want_input)
    assert torch.equal(layer.weight.grad, want_weight)


def test_an_op_that_saved_its_output_still_differentiates():
    x = torch.randn(3, 4, requires_grad=True)
    grad = torch.randn(3, 4)
    torch.tanh(x * 2).backward(grad)  # tanh's backward reads its own output
    want = x.grad.clone()
    x.grad = None
    output = torch.tanh(x * 2)
    deallocate_output_data(output)
    torch.autograd.backward(output, grad_tensors=grad)
    assert torch.equal(x.grad, want)


def test_a_view_keeps_its_values():
    base = torch.randn(4, 8, requires_grad=True) * 1.0
    view = base[:2]
    deallocate_output_data(view)
    assert view.untyped_storage().nbytes() == base.untyped_storage().nbytes()
