"""Building blocks: layers that add their parameters to a Graph and are called on Tensors.

A layer is created with the graph it lives in and a name; its parameters are named
`f"{name}.weight"`, `f"{name}.bias"`, ... and laid out as in PyTorch and Hugging Face
checkpoints, with PyTorch's default initialization. Calling it on a Tensor appends the
nodes that compute it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import pairwise

from meganeura import init
from meganeura.functional import batch_norm, embedding, group_norm, layer_norm, relu, rms_norm
from meganeura.graph import Graph, Tensor

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
