"""Building blocks: layers that add their parameters to a Graph and are called on Tensors.

A layer is created with the graph it lives in and a name; its parameters are named
`f"{name}.weight"`, `f"{name}.bias"`, ... and laid out as in PyTorch and Hugging Face
checkpoints, with PyTorch's default initialization. Calling it on a Tensor appends the
nodes that compute it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from itertools import pairwise

from meganeura import functional as F
from meganeura import init
from meganeura.functional import batch_norm, embedding, group_norm, layer_norm, relu, rms_norm
from meganeura.graph import Graph, Tensor
from meganeura.ops.conv import spatial_tuple

Layer = Callable[[Tensor], Tensor]


def join(prefix: str, name: str) -> str:
    """A child's full name: `"encoder" + "0"` is `"encoder.0"`; an empty prefix adds nothing."""
    return f"{prefix}.{name}" if prefix else name


class Linear:
    """torch.nn.Linear: `x @ weight.T + bias`, weight stored as [out_features, in_features]."""

    def __init__(
        self, graph: Graph, name: str, in_features: int, out_features: int, bias: bool = True
    ):
        self.graph = graph
        self.name = name
        self.in_features, self.out_features = in_features, out_features
        self.weight = graph.parameter(
            join(name, "weight"), (out_features, in_features), init=init.linear_weight()
        )
        self.bias = (
            graph.parameter(join(name, "bias"), (out_features,), init=init.linear_bias(in_features))
            if bias
            else None
        )

    def __call__(self, x: Tensor) -> Tensor:
        if x.graph is not self.graph:
            raise ValueError(f"Linear {self.name!r}: the input belongs to another graph")
        if x.ndim == 0 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"Linear {self.name!r}: expects inputs with last dim {self.in_features}, "
                f"got {list(x.shape)}"
            )
        rows = x.reshape(1, self.in_features) if x.ndim == 1 else x
        # The weight is read transposed in place: no transposed copy is made.
        y = self.graph.apply("matmul", [rows, self.weight], trans_b=True)
        if x.ndim == 1:
            y = y.reshape(self.out_features)
        return y if self.bias is None else y + self.bias

    def __repr__(self) -> str:
        bias = self.bias is not None
        return f"Linear({self.name!r}, {self.in_features}, {self.out_features}, bias={bias})"


class Sequential:
    """Layers (or any Tensor -> Tensor functions) applied one after another."""

    def __init__(self, *layers: Layer):
        self.layers = list(layers)

    def __call__(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class MLP(Sequential):
    """Linear layers of `sizes` (e.g. [64, 128, 10]) with `activation` between them.

    The Linear layers are named `f"{name}.{2 * i}"`, as in
    `torch.nn.Sequential(Linear, ReLU, Linear, ...)`, so with `name=""` the parameter names
    are that module's state_dict keys ("0.weight", "0.bias", "2.weight", ...).
    """

    def __init__(
        self,
        graph: Graph,
        name: str,
        sizes: Sequence[int],
        activation: Layer = relu,
        bias: bool = True,
    ):
        if len(sizes) < 2:
            raise ValueError(f"MLP {name!r}: sizes needs at least [in, out], got {list(sizes)}")
        layers: list[Layer] = []
        for i, (fan_in, fan_out) in enumerate(pairwise(sizes)):
            if i:
                layers.append(activation)
            layers.append(Linear(graph, join(name, str(2 * i)), fan_in, fan_out, bias))
        super().__init__(*layers)
        self.sizes = list(sizes)


def _check_graph(layer: str, name: str, graph: Graph, x: Tensor) -> None:
    if x.graph is not graph:
        raise ValueError(f"{layer} {name!r}: the input belongs to another graph")


class Embedding:
    """torch.nn.Embedding: rows of `weight` [num_embeddings, embedding_dim] at integer ids,
    initialized N(0, 1)."""

    def __init__(self, graph: Graph, name: str, num_embeddings: int, embedding_dim: int):
        self.graph, self.name = graph, name
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.weight = graph.parameter(
            join(name, "weight"), (num_embeddings, embedding_dim), init=init.normal()
        )

    def __call__(self, ids: Tensor) -> Tensor:
        _check_graph("Embedding", self.name, self.graph, ids)
        return embedding(self.weight, ids)


class RMSNorm:
    """RMSNorm over the last dim, `weight` initialized to ones (torch.nn.RMSNorm, HF Llama)."""

    def __init__(
        self, graph: Graph, name: str, dim: int, eps: float = 1e-6, elementwise_affine=True
    ):
        self.graph, self.name, self.eps = graph, name, eps
        self.weight = (
            graph.parameter(join(name, "weight"), (dim,), init=init.ones())
            if elementwise_affine
            else None
        )

    def __call__(self, x: Tensor) -> Tensor:
        _check_graph("RMSNorm", self.name, self.graph, x)
        return rms_norm(x, self.weight, self.eps)


class LayerNorm:
    """torch.nn.LayerNorm over the last dim: `weight` ones, `bias` zeros."""

    def __init__(
        self,
        graph: Graph,
        name: str,
        dim: int,
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
    ):
        self.graph, self.name, self.eps = graph, name, eps
        self.weight = self.bias = None
        if elementwise_affine:
            self.weight = graph.parameter(join(name, "weight"), (dim,), init=init.ones())
            if bias:
                self.bias = graph.parameter(join(name, "bias"), (dim,), init=init.zeros())

    def __call__(self, x: Tensor) -> Tensor:
        _check_graph("LayerNorm", self.name, self.graph, x)
        return layer_norm(x, self.weight, self.bias, self.eps)


class GroupNorm:
    """torch.nn.GroupNorm over x [N, C, *]: per-channel `weight` ones and `bias` zeros."""

    def __init__(
        self,
        graph: Graph,
        name: str,
        num_groups: int,
        num_channels: int,
        eps: float = 1e-5,
        affine: bool = True,
    ):
        if num_groups < 1 or num_channels % num_groups:
            raise ValueError(
                f"GroupNorm {name!r}: num_groups={num_groups} must be a positive divisor of "
                f"num_channels={num_channels}"
            )
        self.graph, self.name, self.eps = graph, name, eps
        self.num_groups = num_groups
        self.weight = self.bias = None
        if affine:
            self.weight = graph.parameter(join(name, "weight"), (num_channels,), init=init.ones())
            self.bias = graph.parameter(join(name, "bias"), (num_channels,), init=init.zeros())

    def __call__(self, x: Tensor) -> Tensor:
        _check_graph("GroupNorm", self.name, self.graph, x)
        return group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


class BatchNorm2d:
    """torch.nn.BatchNorm2d over x [N, C, H, W].

    In training mode (the default; see `train` and `eval`) the layer normalizes with the
    batch statistics and, with `track_running_stats`, `running_mean` and `running_var`
    (non-trainable parameters, saved with the others) are updated after every training step.
    In eval mode it normalizes with the running statistics. The mode is read when the layer
    is called, as the graph is built.
    """

    def __init__(
        self,
        graph: Graph,
        name: str,
        num_features: int,
        eps: float = 1e-5,
        momentum: float = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
    ):
        self.graph, self.name = graph, name
        self.eps, self.momentum = eps, momentum
        self.training = True
        self.weight = self.bias = self.running_mean = self.running_var = None
        if affine:
            self.weight = graph.parameter(join(name, "weight"), (num_features,), init=init.ones())
            self.bias = graph.parameter(join(name, "bias"), (num_features,), init=init.zeros())
        if track_running_stats:
            self.running_mean = graph.parameter(
                join(name, "running_mean"), (num_features,), init=init.zeros(), trainable=False
            )
            self.running_var = graph.parameter(
                join(name, "running_var"), (num_features,), init=init.ones(), trainable=False
            )

    def train(self, mode: bool = True) -> BatchNorm2d:
        self.training = mode
        return self

    def eval(self) -> BatchNorm2d:
        return self.train(False)

    def __call__(self, x: Tensor) -> Tensor:
        _check_graph("BatchNorm2d", self.name, self.graph, x)
        if x.ndim != 4:
            raise ValueError(f"BatchNorm2d {self.name!r}: expects [N, C, H, W], got {x.type}")
        training = self.training or self.running_mean is None
        return batch_norm(
            x,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            training=training,
            momentum=self.momentum,
            eps=self.eps,
        )


class _ConvNd:
    """Shared by the conv layers: torch's parameter layout and default initialization
    (kaiming_uniform(a=sqrt(5)) for the weight, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for the
    bias, fan_in = weight.shape[1] * kernel area)."""

    def __init__(
        self,
        graph: Graph,
        name: str,
        kind: str,
        weight_shape: tuple[int, ...],
        channels: tuple[int, int],
        groups: int,
        bias: bool,
        padding_mode: str,
    ):
        if padding_mode != "zeros":
            raise ValueError(
                f"{kind} {name!r}: only padding_mode='zeros' is supported, got {padding_mode!r}"
            )
        for what, count in zip(("in_channels", "out_channels"), channels, strict=True):
            if groups < 1 or count % groups:
                raise ValueError(
                    f"{kind} {name!r}: {what} ({count}) must be divisible by groups ({groups})"
                )
        self.graph = graph
        self.name = name
        self.in_channels, self.out_channels = channels
        self.groups = groups
        self.weight = graph.parameter(join(name, "weight"), weight_shape, init=init.linear_weight())
        fan_in = weight_shape[1] * math.prod(weight_shape[2:])
        self.bias = (
            graph.parameter(join(name, "bias"), (self.out_channels,), init=init.linear_bias(fan_in))
            if bias
            else None
        )

    def _check(self, x: Tensor, kind: str) -> None:
        if x.graph is not self.graph:
            raise ValueError(f"{kind} {self.name!r}: the input belongs to another graph")


class _Conv(_ConvNd):
    """Conv1d and Conv2d: torch's constructor arguments, `dims` spatial dims, `conv` applies."""

    dims: int
    conv: Callable[..., Tensor]

    def __init__(
        self,
        graph: Graph,
        name: str,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
    ):
        kind = type(self).__name__
        self.kernel_size = spatial_tuple(kind, "kernel_size", kernel_size, self.dims, 1)
        self.stride, self.padding, self.dilation = stride, padding, dilation
        shape = (out_channels, in_channels // max(groups, 1), *self.kernel_size)
        super().__init__(
            graph, name, kind, shape, (in_channels, out_channels), groups, bias, padding_mode
        )

    def __call__(self, x: Tensor) -> Tensor:
        self._check(x, type(self).__name__)
        return type(self).conv(
            x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups
        )


class Conv2d(_Conv):
    """torch.nn.Conv2d: weight [out_channels, in_channels / groups, kh, kw]."""

    dims = 2
    conv = staticmethod(F.conv2d)


class Conv1d(_Conv):
    """torch.nn.Conv1d: weight [out_channels, in_channels / groups, k]."""

    dims = 1
    conv = staticmethod(F.conv1d)


class ConvTranspose2d(_ConvNd):
    """torch.nn.ConvTranspose2d: weight [in_channels, out_channels / groups, kh, kw]."""

    def __init__(
        self,
        graph: Graph,
        name: str,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        output_padding=0,
        groups: int = 1,
        bias: bool = True,
        dilation=1,
        padding_mode: str = "zeros",
    ):
        self.kernel_size = spatial_tuple("ConvTranspose2d", "kernel_size", kernel_size, 2, 1)
        self.stride, self.padding, self.output_padding = stride, padding, output_padding
        self.dilation = dilation
        shape = (in_channels, out_channels // max(groups, 1), *self.kernel_size)
        super().__init__(
            graph,
            name,
            "ConvTranspose2d",
            shape,
            (in_channels, out_channels),
            groups,
            bias,
            padding_mode,
        )

    def __call__(self, x: Tensor) -> Tensor:
        self._check(x, "ConvTranspose2d")
        return F.conv_transpose2d(
            x,
            self.weight,
            self.bias,
            self.stride,
            self.padding,
            self.output_padding,
            self.groups,
            self.dilation,
        )


class MaxPool2d:
    """torch.nn.MaxPool2d (no parameters)."""

    def __init__(
        self,
        kernel_size,
        stride=None,
        padding=0,
        dilation=1,
        return_indices: bool = False,
        ceil_mode: bool = False,
    ):
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.dilation, self.return_indices, self.ceil_mode = dilation, return_indices, ceil_mode

    def __call__(self, x: Tensor):
        return F.max_pool2d(
            x,
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
            self.ceil_mode,
            self.return_indices,
        )


class AvgPool2d:
    """torch.nn.AvgPool2d (no parameters)."""

    def __init__(
        self,
        kernel_size,
        stride=None,
        padding=0,
        ceil_mode: bool = False,
        count_include_pad: bool = True,
        divisor_override: int | None = None,
    ):
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.ceil_mode, self.count_include_pad = ceil_mode, count_include_pad
        self.divisor_override = divisor_override

    def __call__(self, x: Tensor) -> Tensor:
        return F.avg_pool2d(
            x,
            self.kernel_size,
            self.stride,
            self.padding,
            self.ceil_mode,
            self.count_include_pad,
            self.divisor_override,
        )


class AdaptiveAvgPool2d:
    """torch.nn.AdaptiveAvgPool2d (no parameters)."""

    def __init__(self, output_size):
        self.output_size = output_size

    def __call__(self, x: Tensor) -> Tensor:
        return F.adaptive_avg_pool2d(x, self.output_size)


class Flatten:
    """torch.nn.Flatten: merge dims start_dim..end_dim (by default all but the batch dim)."""

    def __init__(self, start_dim: int = 1, end_dim: int = -1):
        self.start_dim, self.end_dim = start_dim, end_dim

    def __call__(self, x: Tensor) -> Tensor:
        start, end = self.start_dim % x.ndim, self.end_dim % x.ndim
        if start > end:
            raise ValueError(
                f"Flatten: start_dim {self.start_dim} comes after end_dim {self.end_dim} "
                f"for shape {list(x.shape)}"
            )
        merged = math.prod(x.shape[start : end + 1])
        return x.reshape(*x.shape[:start], merged, *x.shape[end + 1 :])
