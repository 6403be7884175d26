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
from meganeura.functional import relu
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
