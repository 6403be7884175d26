"""Session: a graph built for one device, with its parameters, optimizer state and programs.

`build` differentiates the loss, appends the optimizer's update rules to the graph and hands it
to a device executor. `Session.step` runs one training step (forward, backward, update) as one
submission and returns without waiting; `Session.run` runs the forward pass and returns
NumPy arrays; reading the loss or an output waits for the device.

Programs are compiled per set of requested outputs, on first use, so nodes appended to
`session.graph` after the build (reading its parameters, adding none) run like the others:
a language model adds the computation for a new prompt length this way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from meganeura.autodiff import grad
from meganeura.graph import Graph, Tensor, numpy_dtype
from meganeura.init import initial_value


def _copy_graph(graph: Graph) -> Graph:
    return dataclasses.replace(
        graph,
        nodes=list(graph.nodes),
        inputs=dict(graph.inputs),
        parameters=dict(graph.parameters),
        parameter_specs=dict(graph.parameter_specs),
        outputs=dict(graph.outputs),
        updates=dict(graph.updates),
        write_backs={t: list(v) for t, v in graph.write_backs.items()},
    )


def build(
    graph: Graph,
    loss: Tensor | None = None,
    optimizer: Any = None,
    device: str = "auto",
    seed: int = 0,
) -> Session:
    """Build `graph` for `device` ("auto", "gpu", "vulkan-cpu" or "cpu").

    With `loss` and `optimizer`, `Session.step` trains every trainable parameter.
    Parameters are initialized from their init specs with a generator seeded by `seed`.
    """
    from meganeura.backends import open_executor

    g = _copy_graph(graph)
    loss_id = None
    if loss is not None:
        if loss.graph is not graph:
            raise ValueError("build: loss belongs to another graph")
        if loss.shape != ():
            raise ValueError(f"build: loss must be a scalar, got shape {list(loss.shape)}")
        loss_id = loss.id
    hyper = None
    if optimizer is not None:
        if loss_id is None:
            raise ValueError("build: an optimizer needs a loss")
        trainable = {
            name: Tensor(g, nid)
            for name, nid in g.parameters.items()
            if g.parameter_specs[name].trainable
        }
        if not trainable:
            raise ValueError("build: the graph has no trainable parameters")
        grads = grad(Tensor(g, loss_id), list(trainable.values()))
        hyper = optimizer.attach(g, trainable, dict(zip(trainable, grads, strict=True)))
    executor = open_executor(device)
    return Session(g, executor, loss_id, optimizer, hyper, seed)


class Session:
    def __init__(self, graph: Graph, executor, loss_id, optimizer, hyper, seed: int):
        self.graph = graph
        self.executor = executor
        self.optimizer = optimizer
        self.step_count = 0
        self._loss_id = loss_id
        self._hyper = hyper  # step -> {input name: value}, from the optimizer
        self._programs: dict[str, Any] = {}
        self._last: Any = None
        rng = np.random.default_rng(seed)
        for name, nid in graph.parameters.items():
            node = graph.nodes[nid]
            spec = graph.parameter_specs[name]
            value = initial_value(
                name, spec.init, node.type.shape, numpy_dtype(node.type.dtype), rng
            )
            executor.set_value(nid, value)

    @property
    def device(self) -> str:
        return self.executor.description

    # -- running ------------------------------------------------------------------------------
    def _program(self, roots: tuple[int, ...], train: bool):
        key = (roots, train)
        if key not in self._programs:
            updates = dict(self.graph.updates) if train else {}
            updates.update(self._write_backs(roots, updates))
            self._programs[key] = self.executor.compile(self.graph, list(roots), updates)
        return self._programs[key]

    def _write_backs(self, roots, updates: dict[int, int]) -> dict[int, int]:
        """The write-backs whose values these roots depend on, one per target at most."""
        live = set(self.graph.live_nodes(list(roots) + list(updates.values())))
        out: dict[int, int] = {}
        for target, values in self.graph.write_backs.items():
            computed = [v for v in values if v in live]
            name = self.graph.nodes[target].name
            if len(computed) > 1 or (computed and target in updates):
                raise ValueError(
                    f"state {name!r} would be written twice by one program "
                    f"(by {', '.join(self.graph.nodes[v].describe() for v in computed)})"
                )
            if computed:
                out[target] = computed[0]
        return out

    def _needed_inputs(self, roots) -> set[str]:
        live = set(self.graph.live_nodes(roots))
        return {name for name, nid in self.graph.inputs.items() if nid in live}

    def step(self, inputs: Mapping[str, Any]) -> None:
        """One training step: forward, backward and optimizer update, in one submission."""
        if self.optimizer is None:
            raise RuntimeError("step: this session was built without an optimizer; use run()")
        g = self.graph
        roots = (*g.outputs.values(), self._loss_id)
        values = {**inputs, **self._hyper(self.step_count)}
        program = self._program(roots, train=True)
        needed = self._needed_inputs((*roots, *g.updates.values()))
        program.run(self._feeds(values, needed))
        self._last = program
        self.step_count += 1

    def run(self, inputs: Mapping[str, Any] | None = None, outputs=None) -> dict[str, np.ndarray]:
        """Forward pass only (no update); returns the named outputs as NumPy arrays.

        The loss is computed too when `inputs` hold everything it needs (labels included).
        """
        g = self.graph
        inputs = dict(inputs or {})
        names = list(g.outputs) if outputs is None else list(outputs)
        for name in names:
            if name not in g.outputs:
                raise KeyError(f"run: no output named {name!r}; outputs are {sorted(g.outputs)}")
        roots = tuple(g.outputs[n] for n in names)
        if self._loss_id is not None and self._needed_inputs([self._loss_id]) <= set(inputs):
            roots += (self._loss_id,)
        program = self._program(roots, train=False)
        program.run(self._feeds(inputs, self._needed_inputs(roots)))
        self._last = program
        return {name: program.read(g.outputs[name]) for name in names}

    @property
    def loss(self) -> float:
        """The loss of the last step or run (waits for the device)."""
        if self._loss_id is None:
            raise RuntimeError("loss: this session was built without a loss")
        if self._last is None:
            raise RuntimeError("loss: nothing has run yet; call step() or run() first")
        return float(self._last.read(self._loss_id))

    def read(self, name: str) -> np.ndarray:
        """An output of the last step or run, by name (waits for the device)."""
        if name not in self.graph.outputs:
            raise KeyError(
                f"read: no output named {name!r}; outputs are {sorted(self.graph.outputs)}"
            )
        if self._last is None:
            raise RuntimeError("read: nothing has run yet; call step() or run() first")
        return self._last.read(self.graph.outputs[name])

    # -- parameters -------------------------------------------------------------------------
    def parameters(self, include_state: bool = False) -> dict[str, np.ndarray]:
        """Current parameter values by name (optimizer state too with include_state)."""
        return {
            name: self.executor.get_value(nid)
            for name, nid in self.graph.parameters.items()
            if include_state or not self.graph.parameter_specs[name].state
        }

    def set_parameters(self, values: Mapping[str, np.ndarray]) -> None:
        for name, value in values.items():
            if name not in self.graph.parameters:
                raise KeyError(f"set_parameters: no parameter named {name!r}")
            node = self.graph.nodes[self.graph.parameters[name]]
            array = np.asarray(value)
            if array.shape != node.type.shape:
                raise ValueError(
                    f"set_parameters: {name!r} has shape {list(node.type.shape)}, "
                    f"got {list(array.shape)}"
                )
            self.executor.set_value(
                node.id, np.asarray(array, numpy_dtype(node.type.dtype), order="C")
            )

    # -- feeding ------------------------------------------------------------------------------
    def _feeds(self, values: Mapping[str, Any], needed: set[str]) -> dict[int, np.ndarray]:
        g = self.graph
        unknown = sorted(set(values) - set(g.inputs))
        if unknown:
            raise KeyError(
                f"unknown input {unknown[0]!r}; the graph's inputs are {sorted(g.inputs)}"
            )
        missing = sorted(needed - set(values))
        if missing:
            raise KeyError(f"missing input {missing[0]!r}; this computation needs {sorted(needed)}")
        return {
            g.inputs[name]: check_feed(name, values[name], g.nodes[g.inputs[name]].type)
            for name in needed
        }


def check_feed(name: str, value: Any, ttype) -> np.ndarray:
    """`value` as a contiguous array of the input's type, or an error saying what was expected."""
    array = np.asarray(value)
    want = numpy_dtype(ttype.dtype)
    if array.shape != ttype.shape:
        raise ValueError(
            f"input {name!r}: expected shape {list(ttype.shape)} ({ttype}), got {list(array.shape)}"
        )
    if array.dtype != want:
        same_kind = array.dtype.kind == want.kind or (want.kind == "f" and array.dtype.kind in "iu")
        if not same_kind or (want.kind in "iu" and not np.array_equal(array, array.astype(want))):
            raise TypeError(
                f"input {name!r}: expected dtype {ttype.dtype} ({ttype}), got {array.dtype}"
            )
        array = array.astype(want)
    return np.asarray(array, order="C")  # np.ascontiguousarray would make 0-d arrays 1-d
