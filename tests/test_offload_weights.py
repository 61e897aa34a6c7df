"""A processor that reads a layer's weights itself sees them under sequential CPU offload.

accelerate's sequential offload keeps each layer's weights on the meta device and loads them only
around that layer's forward; LTX-Video's fused cross-attention slices the fused weight itself, which
failed with "Tensor on device meta" on the GPU until it asked the hook (batch_runner.upstream).
"""

from __future__ import annotations

import torch
from accelerate import cpu_offload

from batch_runner.upstream import weights_on_device


def test_an_offloaded_layers_weights_are_real_inside_the_context_and_offloaded_after() -> None:
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 6)
    expected = layer.weight.detach().clone()
    cpu_offload(layer, execution_device=torch.device("cpu"))
    assert layer.weight.device.type == "meta"
    with weights_on_device(layer):
        assert torch.equal(layer.weight, expected)
    assert layer.weight.device.type == "meta"


def test_a_layer_without_hooks_is_left_alone() -> None:
    layer = torch.nn.Linear(4, 6)
    with weights_on_device(layer):
        assert layer.weight.device.type == "cpu"
