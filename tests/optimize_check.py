"""Checks that the e-graph optimizer changes how a graph computes, never what it computes."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import numpy as np

from meganeura.backends.numpy.executor import evaluate
from meganeura.graph import Graph, numpy_dtype
from meganeura.optimize import Optimized, optimize

RTOL = 2e-4
ATOL = 2e-5


def random_feeds(graph: Graph, rng: np.random.Generator, ints: dict | None = None) -> dict:
    """A value for every input and parameter: normal floats, integers below `ints[name]`."""
    feeds = {}
    for table in (graph.inputs, graph.parameters):
        for name, nid in table.items():
            t = graph.nodes[nid].type
            if t.dtype in ("f32", "f16"):
                value = rng.standard_normal(t.shape)
            elif t.dtype == "bool":
                value = rng.random(t.shape) < 0.5
            else:
                value = rng.integers(0, (ints or {}).get(name, 4), t.shape)
            feeds[name] = np.asarray(value, numpy_dtype(t.dtype))
    return feeds


def values_by_name(graph: Graph, feeds: dict, roots: Iterable[int] = ()) -> dict:
    """Every output and update of `graph` (and `roots`, by id) evaluated on named feeds."""
    fed = {}
    for table in (graph.inputs, graph.parameters):
        for name, nid in table.items():
            if name in feeds:
                fed[nid] = feeds[name]
    # Weights the optimizer stored together are fed through their storage.
    parts: dict[str, list] = {}
    for name, view in graph.parameter_views.items():
        if name in feeds:
            parts.setdefault(view.storage, []).append((view.start, feeds[name], view.axis))
    for storage, pieces in parts.items():
        pieces.sort(key=lambda p: p[0])
        fed[graph.parameters[storage]] = np.concatenate([p[1] for p in pieces], pieces[0][2])
    wanted = [*graph.outputs.values(), *graph.updates.values(), *roots]
    values = evaluate(graph, wanted, fed)
    out = {f"out:{n}": values[i] for n, i in graph.outputs.items()}
    names = {nid: name for name, nid in graph.parameters.items()}
    for t, v in graph.updates.items():
        members = [(n, w) for n, w in graph.parameter_views.items() if w.storage == names[t]]
        if not members:
            out[f"update:{names[t]}"] = values[v]
        for name, view in members:
            index = [slice(None)] * (view.axis + 1)
            index[view.axis] = slice(view.start, view.stop)
            out[f"update:{name}"] = values[v][tuple(index)]
    return out, values


def assert_same_values(a: dict, b: dict, rtol: float = RTOL, atol: float = ATOL) -> None:
    assert a.keys() == b.keys()
    for key in a:
        x, y = np.asarray(a[key], np.float64), np.asarray(b[key], np.float64)
        assert x.shape == y.shape, key
        finite = np.abs(x[np.isfinite(x)])
        scale = max(1.0, float(finite.max()) if finite.size else 1.0)
        np.testing.assert_allclose(y, x, rtol=rtol, atol=atol * scale, err_msg=key, equal_nan=True)


def check_optimized(
    graph: Graph, roots: Iterable[int] = (), seed: int = 0, ints: dict | None = None, **kw
) -> Optimized:
    """Optimize `graph` and check that outputs, updates and `roots` keep their values."""
    roots = list(roots)
    result = optimize(graph, roots, count=True, **kw)
    rng = np.random.default_rng(seed)
    feeds = random_feeds(graph, rng, ints)
    before, raw_before = values_by_name(graph, feeds, roots)
    after, raw_after = values_by_name(result.graph, feeds, [result.ids[r] for r in roots])
    for r in roots:
        before[f"root:{r}"] = raw_before[r]
        after[f"root:{r}"] = raw_after[result.ids[r]]
    assert_same_values(before, after)
    return result


def op_counts(graph: Graph, roots: Iterable[int] = ()) -> Counter:
    live = graph.live_nodes([*roots, *graph.outputs.values(), *graph.updates.values()])
    return Counter(graph.nodes[n].op for n in live)
