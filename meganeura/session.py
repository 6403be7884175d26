"""Session: a graph built for one device, with its parameters, optimizer state and programs.

`build` differentiates the loss, appends the optimizer's update rules to the graph and hands it
to a device executor. `Session.step` runs one training step (forward, backward, update) as one
submission and returns without waiting; `Session.run` runs the forward pass and returns
NumPy arrays; reading the loss or an output waits for the device.

Programs are compiled per set of requested outputs, on first use, so nodes appended to
`session.graph` after the build (reading its parameters, adding none; extra gradients, say)
run like the others.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from meganeura import checkpoint
from meganeura.amp import LossScaler, check_device, to_mixed_precision
from meganeura.autodiff import grad
from meganeura.checkpoint import CheckpointError
from meganeura.debug import check_indices, check_sources, enabled_by_env, index_limits
from meganeura.graph import Graph, Tensor, numpy_dtype
from meganeura.init import initial_value
from meganeura.lower.rewrite import lowered
from meganeura.optim import ACCUMULATE_INPUT, UpdateRules, storage_aliases


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
        write_backs={t: list(v) for t, v in graph.write_backs.items()},
    )


MATMUL_PRECISIONS = ("highest", "high")


@dataclass
class LoadResult:
    """What `Session.load` found: names it could not match, and the saved `extra` state."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


def build(
    graph: Graph,
    loss: Tensor | None = None,
    optimizer: Any = None,
    device: str = "auto",
    seed: int = 0,
    amp: bool | LossScaler = False,
    check_finite: bool | None = None,
    matmul_precision: str = "highest",
    optimize: bool | None = None,
) -> Session:
    """Build `graph` for `device` ("auto", "gpu", "vulkan-cpu" or "cpu").

    With `loss` and `optimizer`, `Session.step` trains every trainable parameter that no
    frozen group of the optimizer holds. Parameters are initialized from their init specs
    with a generator seeded by `seed`. `amp=True` (or a `LossScaler`) computes in mixed
    precision with dynamic loss scaling (see `meganeura.amp`); `check_finite=True` (default:
    the environment variable MEGANEURA_DEBUG_NAN) runs kernels one by one and names the
    first that produces an inf or NaN. `matmul_precision`, like
    torch.set_float32_matmul_precision: "highest" keeps f32 matmuls in f32; "high" lets them
    (products large enough to fill the GPU) and attention forwards of 64 queries or more run
    on the GPU's matrix units with f16 operands and f32 accumulation where a start-up check
    finds those correct and faster than the f32 kernels (f32 everywhere else). f16 matmuls
    and attention use matrix units whenever they work. With `optimize` (the default, except under
    check_finite, which names the nodes of the graph as written) the e-graph optimizer
    rewrites the forward graph before autodiff and the whole step graph after it
    (`Session.optimize_report` says what it did); `optimize=False` builds the graph as
    written, for comparisons.
    """
    from meganeura.backends import open_executor

    if matmul_precision not in MATMUL_PRECISIONS:
        raise ValueError(
            f"build: matmul_precision must be one of {MATMUL_PRECISIONS}, got {matmul_precision!r}"
        )

    if loss is not None:
        if loss.graph is not graph:
            raise ValueError("build: loss belongs to another graph")
        if loss.shape != ():
            raise ValueError(f"build: loss must be a scalar, got shape {list(loss.shape)}")
    if optimizer is not None and loss is None:
        raise ValueError("build: an optimizer needs a loss")
    scaler = LossScaler() if amp is True else amp or None
    if scaler is not None and not isinstance(scaler, LossScaler):
        raise TypeError(f"build: amp must be a bool or an amp.LossScaler, got {amp!r}")
    executor = open_executor(device, matmul_precision)
    if scaler is not None:
        check_device(executor)
    if check_finite is None:
        check_finite = enabled_by_env()
    if optimize is None:
        optimize = not check_finite
    g, loss_id, rules, report = _step_graph(graph, loss, optimizer, scaler, optimize)
    session = Session(g, executor, loss_id, optimizer, rules, seed, bool(check_finite))
    if report is not None:
        session.optimize_report = _count(report, graph, loss, optimizer, scaler, g, loss_id)
    return session


def build_report(graph: Graph, loss: Tensor | None = None, optimizer: Any = None):
    """What `build(graph, loss, optimizer)` would do to the graph, without a device or any
    parameter values: the optimizer's report (see `Session.optimize_report`)."""
    g, loss_id, _, report = _step_graph(graph, loss, optimizer, None, optimize=True)
    return _count(report, graph, loss, optimizer, None, g, loss_id)


def _step_graph(graph: Graph, loss: Tensor | None, optimizer: Any, scaler, optimize: bool):
    """The graph a session runs: `graph` (in mixed precision with a scaler) differentiated and
    given its optimizer's update rules, optimized before and after autodiff when `optimize`
    is set. Returns it with the loss's id, the update rules and the optimizer's report."""
    if scaler is not None:
        g, ids = to_mixed_precision(graph)
    else:
        g, ids = _copy_graph(graph), None
    loss_id = None if loss is None else ids[loss.id] if ids else loss.id
    report = None
    if optimize:
        from meganeura.optimize import OptimizeReport

        report = OptimizeReport()
        g, ids = _optimized(
            g, [loss_id], report, "forward", optimizer, before_autodiff=optimizer is not None
        )
        loss_id = None if loss_id is None else ids[loss_id]
    rules = None
    if optimizer is not None:
        trainable = [
            name
            for name, spec in g.parameter_specs.items()
            if spec.trainable and name in g.parameters
        ]
        if not trainable:
            raise ValueError("build: the graph has no trainable parameters")
        names = optimizer.trained(trainable, storage_aliases(g))
        if not names:
            raise ValueError("build: every trainable parameter is in a frozen group")
        params = {name: g.tensor(g.parameters[name]) for name in names}
        seed_grad = scaler.attach(g) if scaler is not None else None
        grads = grad(g.tensor(loss_id), list(params.values()), seed=seed_grad)
        rules = optimizer.attach(g, params, dict(zip(names, grads, strict=True)), scaler)
        if optimize:
            extra = [rules.grad_norm, rules.found_inf, *rules.accumulate_updates.values()]
            g, ids = _optimized(g, [loss_id, *extra], report, "train", optimizer)
            loss_id, rules = ids[loss_id], _remapped(rules, ids)
    # Lowering choices every graph goes through (lower/rewrite.py): quantized prompts run
    # dense, attention outputs merged into rows are stored tokens first.
    g, ids = lowered(g)
    if ids is not None:
        loss_id = None if loss_id is None else ids[loss_id]
        rules = None if rules is None else _remapped(rules, ids)
    return g, loss_id, rules, report


def _remapped(rules: UpdateRules, ids: dict[int, int]) -> UpdateRules:
    """`rules` with the nodes they name renumbered by `ids` (a rewritten graph's)."""
    return dataclasses.replace(
        rules,
        grad_norm=None if rules.grad_norm is None else ids[rules.grad_norm],
        found_inf=None if rules.found_inf is None else ids[rules.found_inf],
        accumulate_updates={ids[t]: ids[v] for t, v in rules.accumulate_updates.items()},
    )


def _optimized(g: Graph, roots, report, stage: str, optimizer, before_autodiff: bool = False):
    """The graph rewritten by the e-graph optimizer, and the new id of each old node. Weights
    are stored together only if the optimizer trains them alike (same parameter group)."""
    from meganeura.optimize import optimize

    group = None if optimizer is None else lambda name: id(optimizer.group_of(name))
    result = optimize(
        g, [r for r in roots if r is not None], group_key=group, before_autodiff=before_autodiff
    )
    report.merge(result.report, stage)
    return result.graph, result.ids


def _count(report, graph: Graph, loss, optimizer, scaler, g: Graph, loss_id):
    """Nodes and kernels per step of the session's graph and of the graph as written, and
    the fused ops the optimizer added (plus the matmuls it merged)."""
    from meganeura.optimize import fusions, step_stats

    baseline, base_loss, _, _ = _step_graph(graph, loss, optimizer, scaler, optimize=False)
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
    """A graph built for one device: its parameters, optimizer state, step counters and
    compiled programs (one per set of requested outputs, compiled on first use)."""

    def __init__(
        self,
        graph: Graph,
        executor,
        loss_id: int | None,
        optimizer,
        rules: UpdateRules | None,
        seed: int,
        check_finite: bool = False,
    ):
        self.graph = graph
        self.executor = executor
        self.optimizer = optimizer
        self.check_finite = check_finite
        self.step_count = 0  # calls of step(): batches, micro-batches included
        self.update_count = 0  # optimizer updates (one per `accumulate` steps)
        self._loss_id = loss_id
        self._rules = rules
        self._programs: dict[Any, Any] = {}
        self._norms: dict[str, dict[str, int]] = {}
        self._last: Any = None
        self._last_update: Any = None
        self.optimize_report = None  # what the e-graph optimizer did (build(optimize=True))
        self._index_limits: dict | None = None  # inputs read as indices: their valid ranges
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
                storage = graph.parameter_views[name].storage
                if storage not in staged:
                    stype = graph.nodes[graph.parameters[storage]].type
                    staged[storage] = np.zeros(stype.shape, numpy_dtype(stype.dtype))
                staged[storage][self._where(name)] = value
            else:
                executor.set_value(graph.parameters[name], value)
        for storage, value in staged.items():
            executor.set_value(graph.parameters[storage], value)

    @property
    def _storages(self) -> set[str]:
        """Parameters that hold others (the optimizer's concatenated weights): internal."""
        return {view.storage for view in self.graph.parameter_views.values()}

    def _names(self) -> dict[str, Any]:
        """Every parameter by its own name (those inside a storage included), with its type."""
        return {
            name: self._type_of(name)
            for name in self.graph.parameter_specs
            if name not in self._storages
            and (name in self.graph.parameters or name in self.graph.parameter_views)
        }

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

    def _tensor(self, name: str, of: Tensor | None = None) -> Tensor:
        """Parameter `name` as a tensor of the graph (a slice of its storage for a view), or
        with `of` (a tensor shaped like the parameter's buffer) the same part of `of`."""
        g = self.graph
        if name not in g.parameter_views:
            return of if of is not None else g.tensor(g.parameters[name])
        view = g.parameter_views[name]
        storage = of if of is not None else g.tensor(g.parameters[view.storage])
        starts = [0] * storage.ndim
        stops = list(storage.shape)
        starts[view.axis], stops[view.axis] = view.start, view.stop
        return g.apply("slice", [storage], starts=starts, stops=stops)

    @property
    def device(self) -> str:
        return self.executor.description

    # -- running ------------------------------------------------------------------------------
    def _updates(self, mode: str) -> dict[int, int]:
        """The updates a program applies: none (forward), the optimizer step's (update), or
        those of a micro-step that only accumulates gradients."""
        if mode == "update":
            return self.graph.updates
        if mode == "accumulate":
            return self._rules.accumulate_updates
        return {}

    def _program(self, roots: tuple[int, ...], mode: str) -> tuple[Any, set[str]]:
        """The compiled program computing `roots` and applying `mode`'s updates, and the
        inputs it needs; both are made once and cached (a step only looks them up)."""
        key = (roots, mode)
        if key not in self._programs:
            updates = dict(self._updates(mode))
            updates.update(self._write_backs(roots, updates))
            program = self.executor.compile(self.graph, list(roots), updates)
            self._programs[key] = (program, self._needed_inputs((*roots, *updates.values())))
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

    def _run(self, roots: tuple[int, ...], mode: str, values) -> Any:
        program, needed = self._program(roots, mode)
        feeds = self._feeds(values, needed)
        if self.check_finite:
            live = set(self.graph.live_nodes((*roots, *self._updates(mode).values())))
            params = {
                nid: self.executor.get_value(nid)
                for nid in self.graph.parameters.values()
                if nid in live
            }
            check_sources(self.graph, {**params, **feeds})
            program.run(feeds, check_finite=True)
        else:
            program.run(feeds)
        self._last = program
        return program

    def step(self, inputs: Mapping[str, Any]) -> None:
        """One training step: forward, backward and optimizer update, in one submission.

        With gradient accumulation over k micro-batches, k-1 of every k steps only add their
        gradients to the running sums; the k-th adds its own and updates the parameters.
        """
        if self.optimizer is None:
            raise RuntimeError("step: this session was built without an optimizer; use run()")
        g, rules = self.graph, self._rules
        values = dict(inputs)
        every = rules.accumulate_every
        applies = (self.step_count + 1) % every == 0
        if every > 1:
            values[ACCUMULATE_INPUT] = np.bool_(self.step_count % every != 0)
        if applies:
            values.update(rules.scalars(self.update_count))
        extra = () if rules.grad_norm is None or not applies else (rules.grad_norm,)
        roots = (*g.outputs.values(), self._loss_id, *extra)
        program = self._run(roots, "update" if applies else "accumulate", values)
        if applies:
            self._last_update = program
        self.step_count += 1
        self.update_count += applies

    def run(self, inputs: Mapping[str, Any] | None = None, outputs=None) -> dict[str, np.ndarray]:
        """Forward pass only (no update); returns the named outputs as NumPy arrays.

        The loss is computed too when `inputs` hold everything it needs (labels included).
        """
        inputs = dict(inputs or {})
        names, roots = self._forward_roots("run", inputs, outputs)
        program = self._run(roots, "forward", inputs)
        return {name: program.read(self.graph.outputs[name]) for name in names}

    def runner(self, outputs: Sequence[str]) -> Callable[[Mapping[str, Any]], dict]:
        """A function that does `run(inputs, outputs)` for a loop that calls it many times (a
        generation loop): the program is found once, and an input that is already a
        contiguous array of its exact dtype and shape goes to the device as it is (anything
        else is checked and converted as `run` does). Index inputs are still checked for
        values out of range, which kernels would read silently."""
        names, roots = self._forward_roots("runner", {}, outputs)
        program, needed = self._program(roots, "forward")
        g = self.graph
        if self._index_limits is None:
            self._index_limits = index_limits(g)
        specs = []
        for name in sorted(needed):
            nid = g.inputs[name]
            ttype = g.nodes[nid].type
            specs.append((name, nid, ttype, numpy_dtype(ttype.dtype), self._index_limits.get(nid)))
        reads = [(name, g.outputs[name]) for name in names]

        def run(inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
            if self.check_finite or len(inputs) != len(specs):
                return self.run(inputs, names)  # (its checks and errors)
            feeds = {}
            for name, nid, ttype, dtype, limits in specs:
                if name not in inputs:
                    return self.run(inputs, names)
                value = inputs[name]
                if not (
                    type(value) is np.ndarray
                    and value.dtype == dtype
                    and value.shape == ttype.shape
                    and value.flags.c_contiguous
                ):
                    value = check_feed(name, value, ttype)
                if limits is not None:
                    check_indices(name, value, limits)
                feeds[nid] = value
            program.run(feeds)
            self._last = program
            return {name: program.read(nid) for name, nid in reads}

        return run

    def _forward_roots(self, caller: str, inputs, outputs) -> tuple[list[str], tuple[int, ...]]:
        """The outputs `outputs` names (all by default), checked, and the roots of the forward
        program computing them: the loss too when `inputs` hold everything it needs."""
        g = self.graph
        names = list(g.outputs) if outputs is None else list(outputs)
        for name in names:
            if name not in g.outputs:
                raise KeyError(
                    f"{caller}: no output named {name!r}; outputs are {sorted(g.outputs)}"
                )
        roots = tuple(g.outputs[n] for n in names)
        if self._loss_id is not None and self._needed_inputs([self._loss_id]) <= set(inputs):
            roots += (self._loss_id,)
        return names, roots

    def profile(self, inputs: Mapping[str, Any] | None = None, outputs=None) -> list:
        """GPU time of every kernel of the forward program that `run(inputs, outputs)` uses,
        measured with timestamp queries around each kernel: a list of (kernel label,
        workgroup grid, microseconds) in launch order. Parameters are not changed and the
        results are not kept. Needs a WebGPU adapter that offers timestamp-query."""
        program, feeds = self._timed_program("profile", inputs, outputs)
        return program.profile(feeds)

    def device_time(
        self, inputs: Mapping[str, Any] | None = None, outputs=None, repeats: int = 10
    ) -> float:
        """Device time, in microseconds, of the forward program that `run(inputs, outputs)`
        uses: its kernels recorded `repeats` times over in one compute pass, timestamps
        around the pass. What a run costs the device when the host keeps it busy (`profile`'s
        per-kernel times each include a pass of their own). State that the program writes
        back (a KV cache) is written `repeats` times, with the same values. Needs a WebGPU
        adapter that offers timestamp-query."""
        if repeats < 1:
            raise ValueError(f"device_time: repeats must be >= 1, got {repeats}")
        program, feeds = self._timed_program("device_time", inputs, outputs)
        return program.device_time(feeds, repeats)

    def _timed_program(self, caller: str, inputs, outputs) -> tuple[Any, dict]:
        """The forward program that `run(inputs, outputs)` uses and its feeds, for timing on
        a WebGPU device."""
        if not hasattr(self.executor, "gpu"):
            raise RuntimeError(f"{caller}: the NumPy executor has no kernels to time")
        inputs = dict(inputs or {})
        _, roots = self._forward_roots(caller, inputs, outputs)
        program, needed = self._program(roots, "forward")
        return program, self._feeds(inputs, needed)

    @property
    def kernel_count(self) -> int | None:
        """Kernels the last step or run launched; None on the NumPy executor, which has none."""
        dispatches = getattr(self._last, "dispatches", None)
        return None if dispatches is None else len(dispatches)

    @property
    def loss(self) -> float:
        """The loss of the last step or run (waits for the device)."""
        if self._loss_id is None:
            raise RuntimeError("loss: this session was built without a loss")
        if self._last is None:
            raise RuntimeError("loss: nothing has run yet; call step() or run() first")
        return float(self._last.read(self._loss_id))

    @property
    def grad_norm(self) -> float:
        """The global gradient norm (before clipping) of the last update (waits)."""
        rules = self._rules
        if rules is None or rules.grad_norm is None:
            raise RuntimeError("grad_norm: the optimizer has no clip_grad_norm")
        if self._last_update is None:
            raise RuntimeError("grad_norm: no update has run yet in this session")
        return float(self._last_update.read(rules.grad_norm))

    @property
    def loss_scaling(self) -> bool:
        """Whether the session trains with dynamic loss scaling (amp)."""
        return LossScaler.SCALE in self.graph.parameters

    @property
    def loss_scale(self) -> float:
        """The current loss scale of mixed-precision training (waits)."""
        if not self.loss_scaling:
            raise RuntimeError("loss_scale: this session was built without amp")
        return float(self.executor.get_value(self.graph.parameters[LossScaler.SCALE]))

    def read(self, name: str) -> np.ndarray:
        """An output of the last step or run, by name (waits for the device)."""
        if name not in self.graph.outputs:
            raise KeyError(
                f"read: no output named {name!r}; outputs are {sorted(self.graph.outputs)}"
            )
        if self._last is None:
            raise RuntimeError("read: nothing has run yet; call step() or run() first")
        return self._last.read(self.graph.outputs[name])

    # -- inspection ---------------------------------------------------------------------------
    def _norm_nodes(self, kind: str) -> dict[str, int]:
        """Per-parameter L2 norms of the weights or gradients, added to the graph on first use."""
        if kind not in self._norms:
            g = self.graph
            if kind == "weights":
                tensors = {
                    name: self._tensor(name)
                    for name in self._names()
                    if not g.parameter_specs[name].state
                }
            else:
                if self._loss_id is None:
                    raise RuntimeError("grad_norms: this session was built without a loss")
                names = [n for n in self._names() if g.parameter_specs[n].trainable]
                if self.optimizer is not None:
                    names = self.optimizer.trained(names)
                # A view's gradient is its part of its storage's gradient.
                views = g.parameter_views
                bases = list(dict.fromkeys(views[n].storage if n in views else n for n in names))
                wrt = [g.tensor(g.parameters[b]) for b in bases]
                by_base = dict(zip(bases, grad(g.tensor(self._loss_id), wrt), strict=True))
                tensors = {
                    n: self._tensor(n, by_base[views[n].storage if n in views else n])
                    for n in names
                }
            self._norms[kind] = {
                name: (t.astype("f32") * t.astype("f32")).sum().sqrt().id
                for name, t in tensors.items()
            }
        return self._norms[kind]

    def grad_norms(self, inputs: Mapping[str, Any]) -> dict[str, float]:
        """The L2 norm of each trained parameter's gradient of the loss on the batch
        `inputs`, computed on the device; nothing is updated."""
        nodes = self._norm_nodes("grads")
        program = self._run(tuple(nodes.values()), "forward", inputs)
        return {name: float(program.read(nid)) for name, nid in nodes.items()}

    def weight_norms(self) -> dict[str, float]:
        """The L2 norm of each parameter (optimizer state excluded), computed on the device."""
        nodes = self._norm_nodes("weights")
        program = self._run(tuple(nodes.values()), "forward", {})
        return {name: float(program.read(nid)) for name, nid in nodes.items()}

    # -- parameters -------------------------------------------------------------------------
    def parameters(self, include_state: bool = False) -> dict[str, np.ndarray]:
        """Current parameter values by name (optimizer state too with include_state)."""
        g, out = self.graph, {}
        stored: dict[str, np.ndarray] = {}
        for name in self._names():
            if g.parameter_specs[name].state and not include_state:
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
        g, names = self.graph, self._names()
        stored: dict[str, np.ndarray] = {}
        for name, value in values.items():
            if name not in names:
                raise KeyError(f"set_parameters: no parameter named {name!r}")
            ttype = names[name]
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

    # -- checkpoints --------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, extra: Mapping[str, Any] | None = None) -> None:
        """Save parameters, optimizer state, step counters, schedules and the JSON-able
        `extra` to a safetensors file, atomically (see `meganeura.checkpoint`)."""
        schedules = self.optimizer.schedules() if self.optimizer is not None else {}
        state = {
            "step_count": self.step_count,
            "update_count": self.update_count,
            "schedules": {name: s.state_dict() for name, s in schedules.items()},
            "extra": dict(extra or {}),
        }
        checkpoint.save(path, self.parameters(include_state=True), state)

    def load(
        self, path: str | os.PathLike, strict: bool = True, restore_schedules: bool = True
    ) -> LoadResult:
        """Restore what `save` wrote. Tensors the graph lacks, tensors the checkpoint lacks
        and tensors of another shape are reported by name: as a CheckpointError with
        `strict`, else (shapes excepted) in the result, the rest being loaded.

        The optimizer's schedules take the saved settings, as torch's schedulers do; pass
        `restore_schedules=False` to keep the ones it was built with (a run lengthened on
        resume, whose schedule spans the new total)."""
        tensors, state = checkpoint.load(path)
        shapes = {name: t.shape for name, t in self._names().items()}
        missing = [name for name in shapes if name not in tensors]
        unexpected = sorted(name for name in tensors if name not in shapes)
        wrong = [
            f"{name} (checkpoint {list(tensors[name].shape)}, graph {list(shape)})"
            for name, shape in shapes.items()
            if name in tensors and tensors[name].shape != shape
        ]
        if wrong or (strict and (missing or unexpected)):
            problems = [
                f"{label}: {', '.join(names)}"
                for label, names in (
                    ("missing from the checkpoint", missing),
                    ("not in the graph", unexpected),
                    ("wrong shape", wrong),
                )
                if names
            ]
            raise CheckpointError(
                f"checkpoint {os.fspath(path)} does not fit this graph; " + "; ".join(problems)
            )
        self.set_parameters({name: tensors[name] for name in tensors if name in shapes})
        self.step_count = int(state.get("step_count", 0))
        self.update_count = int(state.get("update_count", 0))
        if self.optimizer is not None and restore_schedules:
            current = self.optimizer.schedules()
            for name, saved in state.get("schedules", {}).items():
                if name in current:
                    current[name].load_state_dict(saved)
        self._last = self._last_update = None
        return LoadResult(missing, unexpected, state.get("extra", {}))

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
        if self._index_limits is None:
            self._index_limits = index_limits(g)
        feeds = {}
        for name in needed:
            nid = g.inputs[name]
            feeds[nid] = check_feed(name, values[name], g.nodes[nid].type)
            if nid in self._index_limits:  # GPU kernels would read out of range silently
                check_indices(name, feeds[nid], self._index_limits[nid])
        return feeds


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
