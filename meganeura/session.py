"""Session: a graph built for one device, with its parameters, optimizer state and programs.

`build` differentiates the loss, appends the optimizer's update rules to the graph and hands it
to a device executor. `Session.step` runs one training step (forward, backward, update) as one
submission and returns without waiting; `Session.run` runs the forward pass and returns
NumPy arrays; reading the loss or an output waits for the device.
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
        parameter_views=dict(graph.parameter_views),
    )


def build(
    graph: Graph,
    loss: Tensor | None = None,
    optimizer: Any = None,
    device: str = "auto",
    seed: int = 0,
    optimize: bool = True,
) -> Session:
    """Build `graph` for `device` ("auto", "gpu", "vulkan-cpu" or "cpu").

    With `loss` and `optimizer`, `Session.step` trains every trainable parameter.
    Parameters are initialized from their init specs with a generator seeded by `seed`.
    With `optimize` (the default) the e-graph optimizer rewrites the forward graph before
    autodiff and the whole training graph after it; `optimize=False` builds the graph as
    written, for comparisons. `Session.optimize_report` says what the optimizer did.
    """
    from meganeura.backends import open_executor

    if loss is not None:
        if loss.graph is not graph:
            raise ValueError("build: loss belongs to another graph")
        if loss.shape != ():
            raise ValueError(f"build: loss must be a scalar, got shape {list(loss.shape)}")
    if optimizer is not None and loss is None:
        raise ValueError("build: an optimizer needs a loss")
    g, loss_id, hyper, report = _step_graph(graph, loss, optimizer, optimize)
    session = Session(g, open_executor(device), loss_id, optimizer, hyper, seed)
    if report is not None:
        session.optimize_report = _count(report, graph, loss, optimizer, g, loss_id)
    return session


def build_report(graph: Graph, loss: Tensor | None = None, optimizer: Any = None):
    """What `build(graph, loss, optimizer)` would do to the graph, without a device or any
    parameter values: the optimizer's report (see `Session.optimize_report`)."""
    g, loss_id, _, report = _step_graph(graph, loss, optimizer, optimize=True)
    return _count(report, graph, loss, optimizer, g, loss_id)


def _step_graph(graph: Graph, loss: Tensor | None, optimizer: Any, optimize: bool):
    """The graph a session runs: `graph` differentiated and given its optimizer's updates,
    optimized before and after autodiff when `optimize` is set."""
    g = _copy_graph(graph)
    loss_id = None if loss is None else loss.id
    report = None
    if optimize:
        from meganeura.optimize import OptimizeReport

        report = OptimizeReport()
        g, loss_id = _optimized(g, loss_id, report, "forward")
    hyper = None
    if optimizer is not None:
        trainable = {
            name: Tensor(g, nid)
            for name, nid in g.parameters.items()
            if g.parameter_specs[name].trainable
        }
        if not trainable:
            raise ValueError("build: the graph has no trainable parameters")
        grads = grad(Tensor(g, loss_id), list(trainable.values()))
        hyper = optimizer.attach(g, trainable, dict(zip(trainable, grads, strict=True)))
        if optimize:
            g, loss_id = _optimized(g, loss_id, report, "train")
    return g, loss_id, hyper, report


def _optimized(g: Graph, loss_id: int | None, report, stage: str):
    """The graph rewritten by the e-graph optimizer and the loss's new id."""
    from meganeura.optimize import optimize

    result = optimize(g, [] if loss_id is None else [loss_id])
    report.merge(result.report, stage)
    return result.graph, None if loss_id is None else result.ids[loss_id]


def _count(report, graph: Graph, loss, optimizer, g: Graph, loss_id):
    """Nodes and kernels per step of the session's graph and of the graph as written, and
    the fused ops the optimizer added (plus the matmuls it merged)."""
    from meganeura.optimize import fusions, step_stats

    baseline, base_loss, _, _ = _step_graph(graph, loss, optimizer, optimize=False)
    before = step_stats(baseline, [] if base_loss is None else [base_loss])
    after = step_stats(g, [] if loss_id is None else [loss_id])
    report.nodes_before, report.kernels_before = before.nodes, before.kernels
    report.nodes_after, report.kernels_after = after.nodes, after.kernels
    merged = report.fusions.get("concat_matmul", 0)
    report.fusions = fusions(before, after)
    if merged:
        report.fusions["concat_matmul"] = merged
    return report


class Session:
    def __init__(self, graph: Graph, executor, loss_id, optimizer, hyper, seed: int):
        self.graph = graph
        self.executor = executor
        self.optimizer = optimizer
        self.step_count = 0
        self._loss_id = loss_id
        self._hyper = hyper  # step -> {input name: value}, from the optimizer
        self._programs: dict[str, Any] = {}
        self.optimize_report = None  # what the e-graph optimizer did (build(optimize=True))
        self._last: Any = None
        # Parameters are initialized in the order they were created, whether they have a
        # buffer of their own or live in another's (graph.parameter_views), so one seed gives
        # the same values with and without the optimizer.
        rng = np.random.default_rng(seed)
        staged: dict[str, np.ndarray] = {}
        for name, spec in graph.parameter_specs.items():
            if name in self._storages:
                continue
            ttype = self._type_of(name)
            value = initial_value(name, spec.init, ttype.shape, numpy_dtype(ttype.dtype), rng)
            if name in graph.parameter_views:
                view = graph.parameter_views[name]
                if view.storage not in staged:
                    storage = graph.nodes[graph.parameters[view.storage]].type
                    staged[view.storage] = np.zeros(storage.shape, numpy_dtype(storage.dtype))
                staged[view.storage][self._where(name)] = value
            else:
                executor.set_value(graph.parameters[name], value)
        for storage, value in staged.items():
            executor.set_value(graph.parameters[storage], value)

    @property
    def _storages(self) -> set[str]:
        return {view.storage for view in self.graph.parameter_views.values()}

    def _where(self, name: str) -> tuple[slice, ...]:
        """The index of view `name` in its storage's array."""
        view = self.graph.parameter_views[name]
        index = [slice(None)] * (view.axis + 1)
        index[view.axis] = slice(view.start, view.stop)
        return tuple(index)

    def _type_of(self, name: str):
        """The type of parameter `name`, a view or one with a buffer of its own."""
        g = self.graph
        if name in g.parameter_views:
            view = g.parameter_views[name]
            storage = g.nodes[g.parameters[view.storage]].type
            shape = list(storage.shape)
            shape[view.axis] = view.stop - view.start
            return dataclasses.replace(storage, shape=tuple(shape))
        return g.nodes[g.parameters[name]].type

    @property
    def device(self) -> str:
        return self.executor.description

    # -- running ------------------------------------------------------------------------------
    def _program(self, roots: tuple[int, ...], train: bool):
        key = (roots, train)
        if key not in self._programs:
            updates = self.graph.updates if train else {}
            self._programs[key] = self.executor.compile(self.graph, list(roots), updates)
        return self._programs[key]

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
        g, storages, out = self.graph, self._storages, {}
        stored: dict[str, np.ndarray] = {}
        for name, spec in g.parameter_specs.items():
            if name in storages or (spec.state and not include_state):
                continue
            if name in g.parameter_views:
                storage = g.parameter_views[name].storage
                if storage not in stored:
                    stored[storage] = self.executor.get_value(g.parameters[storage])
                out[name] = np.ascontiguousarray(stored[storage][self._where(name)])
            else:
                out[name] = self.executor.get_value(g.parameters[name])
        return out

    def set_parameters(self, values: Mapping[str, np.ndarray]) -> None:
        g = self.graph
        stored: dict[str, np.ndarray] = {}
        for name, value in values.items():
            if name in self._storages or (
                name not in g.parameters and name not in g.parameter_views
            ):
                raise KeyError(f"set_parameters: no parameter named {name!r}")
            ttype = self._type_of(name)
            array = np.asarray(value)
            if array.shape != ttype.shape:
                raise ValueError(
                    f"set_parameters: {name!r} has shape {list(ttype.shape)}, "
                    f"got {list(array.shape)}"
                )
            array = np.asarray(array, numpy_dtype(ttype.dtype), order="C")
            if name in g.parameter_views:
                storage = g.parameter_views[name].storage
                if storage not in stored:
                    stored[storage] = self.executor.get_value(g.parameters[storage])
                stored[storage][self._where(name)] = array
            else:
                self.executor.set_value(g.parameters[name], array)
        for storage, array in stored.items():
            self.executor.set_value(g.parameters[storage], array)

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
