"""Running the heads' conv → fc stacks in the form a CPU computes fastest; same values, other kernels.

On the CPU: convs in channels-last layout, BatchNorm folded into the preceding conv at inference, and the
box head's first fc computed as a convolution over the pooled 7×7 grid (oneDNN's convolution kernels run
it faster than a flatten and MKL's linear). Tests check that losses, gradients and detections equal the
modules' own forward; GPUs, and stacks with hooks, keep the modules' own forward.
`benchmarks/run.py` measures the heads' speed.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torchvision.ops.misc import Conv2dNormActivation

# below this many RoIs, reordering the fc's weights for the convolution costs more than it saves (break-even
# was ~300 RoIs for the R50 head's 12544 -> 1024 fc)
FC_AS_CONV_MIN_ROWS = 512


def conv_input(x: torch.Tensor) -> torch.Tensor:
    """Pooled RoI features in the layout the conv stacks run fastest in: channels-last on the CPU."""
    return x.contiguous(memory_format=torch.channels_last) if x.device.type == "cpu" and x.dim() == 4 else x


def run_conv_stack(stack: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """``stack(x)`` for a Sequential of conv blocks, then optionally Flatten → Linear → ...; fast kernels on the CPU.

    A stack with forward hooks on it or its modules runs its own forward, so that the hooks still fire; so does a
    traced one (ONNX export): the graph keeps the modules' own ops and the runtime that runs it picks the kernels.
    """
    if x.device.type != "cpu" or x.dim() != 4 or torch.jit.is_tracing():
        return stack(x)
    if any(m._forward_hooks or m._forward_pre_hooks for m in stack.modules()):
        return stack(conv_input(x))
    x = conv_input(x)
    mods = list(stack)
    i = 0
    while i < len(mods):
        m = mods[i]
        nxt = mods[i + 1] if i + 1 < len(mods) else None
        if isinstance(m, Conv2dNormActivation) and _foldable(m):
            x = _folded_block(m, x)
        elif isinstance(m, nn.Flatten) and isinstance(nxt, nn.Linear) and x.dim() == 4 and m.start_dim == 1 \
                and nxt.in_features == math.prod(x.shape[1:]) and len(x) >= FC_AS_CONV_MIN_ROWS:
            x = _linear_as_conv(nxt, x)
            i += 1
        else:
            x = m(x)
        i += 1
    return x


def _foldable(block: nn.Sequential) -> bool:
    """A conv → BatchNorm (running statistics, inference) → ReLU block."""
    parts = list(block)
    if len(parts) != 3 or not isinstance(parts[0], nn.Conv2d) or not isinstance(parts[2], nn.ReLU):
        return False
    bn = parts[1]
    return (isinstance(bn, _BatchNorm) and not bn.training and bn.track_running_stats and bn.affine
            and bn.running_mean is not None)


def _folded_block(block: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    # BN at inference is an affine map per channel, so it folds into the conv's weights and bias: one pass
    # over the activations fewer (folding costs one pass over the small weight tensor)
    conv, bn = block[0], block[1]
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    bias = bn.bias - bn.running_mean * scale
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    weight = conv.weight * scale.view(-1, 1, 1, 1)
    return F.relu_(F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups))


def _linear_as_conv(fc: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    # flatten + linear over [N, C, H, W] is a convolution with an H x W kernel (flatten's order is C, H, W)
    weight = fc.weight.view(fc.out_features, *x.shape[1:]).contiguous(memory_format=torch.channels_last)
    return F.conv2d(x, weight, fc.bias).flatten(1)
