"""write_rows: a run-time position, in-place planning, write-backs of state, on every device."""

import numpy as np
import pytest

from meganeura import Graph, build
from meganeura.lower.plan import plan

DEVICES = ["cpu", pytest.param("vulkan-cpu", marks=pytest.mark.lavapipe)]


def expected(dest, rows, position, axis):
    out = dest.copy()
    start = min(max(position, 0), dest.shape[axis] - rows.shape[axis])
    index = [slice(None)] * dest.ndim
    index[axis] = slice(start, start + rows.shape[axis])
    out[tuple(index)] = rows
    return out


def cache_session(device, shape=(2, 3, 7, 5), rows=1, axis=2):
    """A state cache written back by two computations: one row, and `rows` rows."""
    graph = Graph()
    cache = graph.parameter("cache", shape, state=True)
    position = graph.input("position", (1,), "i32")
    outputs = {}
    for n in sorted({1, rows}):
        row_shape = list(shape)
        row_shape[axis] = n
        new = graph.input(f"new{n}", row_shape)
        written = graph.apply("write_rows", [cache, new * 2.0, position], axis=axis)
        graph.write_back(cache, written)
        # A reader of the new value: ordered after the write by its dependence on it.
        outputs[n] = graph.output(f"sum{n}", written.sum(axis))
    return build(graph, device=device), outputs


@pytest.mark.parametrize("device", DEVICES)
def test_cache_grows_in_place_and_readers_see_the_new_rows(device):
    shape, axis = (2, 3, 7, 5), 2
    session, _ = cache_session(device, shape, rows=3, axis=axis)
    rng = np.random.default_rng(0)
    state = np.zeros(shape, np.float32)
    steps = [(3, 0), (1, 3), (1, 4), (3, 6), (1, -2)]  # the last two clamp into range
    for n, position in steps:
        new = rng.normal(size=(2, 3, n, 5)).astype(np.float32)
        feeds = {f"new{n}": new, "position": np.array([position], np.int32)}
        got = session.run(feeds, outputs=[f"sum{n}"])
        state = expected(state, new * 2.0, position, axis)
        np.testing.assert_allclose(got[f"sum{n}"], state.sum(axis), rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(session.parameters(include_state=True)["cache"], state)


def test_planner_shares_the_cache_buffer_and_writes_no_copy():
    session, _ = cache_session("cpu")
    g = session.graph
    (value,) = g.write_backs[g.parameters["cache"]][:1]
    p = plan(g, [g.outputs["sum1"]], {g.parameters["cache"]: value})
    assert p.copies == []
    assert p.buffer_of[value] == p.buffer_of[g.parameters["cache"]]


@pytest.mark.parametrize("device", DEVICES)
def test_old_value_read_afterwards_gets_a_buffer_of_its_own(device):
    graph = Graph()
    dest = graph.input("dest", (4, 6))
    rows = graph.input("rows", (2, 6))
    position = graph.input("position", (), "i32")
    written = graph.apply("write_rows", [dest, rows, position], axis=0)
    graph.output("both", written + dest * 10.0)  # dest is read after the write
    p = plan(graph, [graph.outputs["both"]], {})
    assert p.buffer_of[written.id] != p.buffer_of[dest.id]
    session = build(graph, device=device)
    rng = np.random.default_rng(1)
    d = rng.normal(size=(4, 6)).astype(np.float32)
    r = rng.normal(size=(2, 6)).astype(np.float32)
    got = session.run({"dest": d, "rows": r, "position": np.int32(1)})["both"]
    np.testing.assert_allclose(got, expected(d, r, 1, 0) + d * 10.0, rtol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_transient_destination_is_written_in_place(device):
    graph = Graph()
    x = graph.input("x", (3, 5, 4))
    rows = graph.input("rows", (3, 1, 4))
    position = graph.input("position", (1,), "i32")
    dest = x.exp()  # a transient only the write reads
    written = graph.apply("write_rows", [dest, rows, position], axis=1)
    graph.output("y", written.sum(1))
    p = plan(graph, [graph.outputs["y"]], {})
    assert p.buffer_of[written.id] == p.buffer_of[dest.id]
    session = build(graph, device=device)
    rng = np.random.default_rng(2)
    xv = rng.normal(size=(3, 5, 4)).astype(np.float32)
    rv = rng.normal(size=(3, 1, 4)).astype(np.float32)
    got = session.run({"x": xv, "rows": rv, "position": np.array([4], np.int32)})["y"]
    np.testing.assert_allclose(got, expected(np.exp(xv), rv, 4, 1).sum(1), rtol=1e-5)


def test_rows_reading_the_destination_are_not_written_in_place():
    graph = Graph()
    cache = graph.parameter("cache", (4, 2), state=True)
    position = graph.input("position", (1,), "i32")
    first = cache.reshape(8).broadcast_to((1, 8)).reshape(4, 2)
    written = graph.apply("write_rows", [cache, first + 1.0, position], axis=0)
    graph.write_back(cache, written)
    graph.output("w", written)
    p = plan(graph, [written.id], {cache.id: written.id})
    assert p.buffer_of[written.id] != p.buffer_of[cache.id]


def test_bad_arguments_name_the_shapes():
    graph = Graph()
    dest = graph.input("dest", (4, 6))
    position = graph.input("position", (1,), "i32")
    with pytest.raises(ValueError, match=r"rows \[2, 5\] must be shaped \[4, 'n'\]"):
        graph.apply("write_rows", [dest, graph.input("r", (2, 5)), position], axis=1)
    with pytest.raises(TypeError, match="position must be one i32 value"):
        graph.apply("write_rows", [dest, graph.input("r2", (1, 6)), dest], axis=0)
    with pytest.raises(ValueError, match="must be a state parameter"):
        graph.write_back(graph.parameter("w", (4, 6)), dest)


def test_one_program_cannot_write_a_state_twice():
    graph = Graph()
    cache = graph.parameter("cache", (4, 2), state=True)
    position = graph.input("position", (1,), "i32")
    a = graph.apply("write_rows", [cache, graph.input("a", (1, 2)), position], axis=0)
    b = graph.apply("write_rows", [cache, graph.input("b", (1, 2)), position], axis=0)
    graph.write_back(cache, a)
    graph.write_back(cache, b)
    graph.output("both", a + b)
    session = build(graph, device="cpu")
    with pytest.raises(ValueError, match="'cache' would be written twice"):
        session.run({"a": np.ones((1, 2)), "b": np.ones((1, 2)), "position": [0]})
