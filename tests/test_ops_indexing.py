"""Views and indexing: slicing, flip, pad, concat, split, repeat, expand, gather, index_select
and embedding, forward and backward against PyTorch; views fuse into their readers."""

import numpy as np
import pytest
import torch
import torch.nn.functional as TF
from hypothesis import given, settings
from hypothesis import strategies as st

import meganeura as mn
from meganeura import functional as F
from meganeura.lower.plan import plan
from tests.torch_check import DEVICES, check, normal


def device_cases(items):
    """(device, case) for every case on the NumPy executor, and the first on lavapipe (whose
    pipelines compile slowly)."""
    params = [pytest.param("cpu", item, id=f"cpu-{n}") for n, item in enumerate(items)]
    return [*params, pytest.param("vulkan-cpu", items[0], marks=pytest.mark.lavapipe, id="vk-0")]


def kernels_of(graph, *outputs):
    return [k.kind for k in plan(graph, [t.id for t in outputs], {}).kernels]


# -- slicing -------------------------------------------------------------------------------

# (meganeura key, torch function): torch has no negative steps, so those flip first.
GETITEM = [
    (lambda x: x[1:, ::2, -3:], lambda x: x[1:, ::2, -3:]),
    (lambda x: x[0], lambda x: x[0]),
    (lambda x: x[..., 1], lambda x: x[..., 1]),
    (lambda x: x[None, :, 2, None], lambda x: x[None, :, 2, None]),
    (lambda x: x[::-1, 1:4:2], lambda x: x.flip(0)[:, 1:4:2]),
    (lambda x: x[:, ::-2, 4:0:-3], lambda x: x.flip(1)[:, ::2].flip(2)[:, :, 1:5:3]),
    (lambda x: x[-1:, 4:5, 5:], lambda x: x[-1:, 4:5, 5:]),
    (lambda x: x[1, -1, 0], lambda x: x[1, -1, 0]),
]


@pytest.mark.parametrize(("device", "case"), device_cases(GETITEM))
def test_getitem_matches_torch(device, case):
    x = normal(np.random.default_rng(0), 3, 5, 6)
    check(*case, {"x": x}, device)


@pytest.mark.parametrize("device", DEVICES)
def test_getitem_with_an_index_tensor(device):
    rng = np.random.default_rng(1)
    x = normal(rng, 4, 5, 3)
    index = np.array([[4, 0], [4, 2]], np.int32)
    check(
        lambda x, i: x[1:, i, None],
        lambda x, i: x[1:, i, None],
        {"x": x, "i": index},
        device,
    )


def test_strided_slice_gradient_is_a_pad_with_gaps():
    graph = mn.Graph()
    x = graph.input("x", (9, 4))
    (g,) = mn.grad(x[1::3].sum(), [x])
    assert g.node.op == "pad" and g.node.attrs["interior"] == (2, 0)


@settings(max_examples=40, deadline=None)
@given(
    shape=st.lists(st.integers(1, 5), min_size=1, max_size=3),
    data=st.data(),
)
def test_random_slices_match_numpy_and_torch(shape, data):
    key = []
    for n in shape:
        start = data.draw(st.none() | st.integers(-n, n - 1))
        stop = data.draw(st.none() | st.integers(-n, n))
        step = data.draw(st.sampled_from([None, 1, 2, 3, -1, -2]))
        if len(range(*slice(start, stop, step).indices(n))) == 0:
            start, stop = None, None
        key.append(slice(start, stop, step))
    key = tuple(key)
    x = normal(np.random.default_rng(len(shape)), *shape)

    def torch_fn(t):
        # torch lacks negative steps: index the flipped tensor with the mirrored positions.
        for axis, k in enumerate(key):
            positions = list(range(*k.indices(shape[axis])))
            t = t.index_select(axis, torch.tensor(positions))
        return t

    outs, _ = check(lambda t: t[key], torch_fn, {"x": x}, "cpu")
    np.testing.assert_array_equal(outs[0], x[key])


# -- flip, pad, concat, split, repeat, expand -----------------------------------------------------


@pytest.mark.parametrize(("device", "axes"), device_cases([(0, 2), (1,), (-1,), (0, 1, 2)]))
def test_flip_matches_torch(device, axes):
    x = normal(np.random.default_rng(2), 3, 1, 5)
    check(lambda x: x.flip(axes), lambda x: x.flip(axes), {"x": x}, device)


PADS = [
    ((2, 1, 0, 3), 0.0),
    ((1, 1), -2.5),
    ((-1, 2, 1, -2), 0.0),
    ((0, 0, 0, 0, 1, 0), 1.0),
    ((3, 0), 0.0),
]


@pytest.mark.parametrize(("device", "case"), device_cases(PADS))
def test_pad_matches_torch(device, case):
    pads, value = case
    x = normal(np.random.default_rng(3), 2, 4, 5)
    check(
        lambda x: F.pad(x, pads, value=value),
        lambda x: TF.pad(x, pads, value=value),
        {"x": x},
        device,
    )


@pytest.mark.parametrize("device", DEVICES)
def test_concat_matches_torch(device):
    rng = np.random.default_rng(4)
    a, b, c = normal(rng, 2, 3, 4), normal(rng, 2, 1, 4), normal(rng, 2, 5, 4)
    check(
        lambda a, b, c: F.cat([a, b * b, c], 1),
        lambda a, b, c: torch.cat([a, b * b, c], 1),
        {"a": a, "b": b, "c": c},
        device,
    )
    if device == "cpu":
        check(lambda a: F.cat([a, -a], -1), lambda a: torch.cat([a, -a], -1), {"a": a}, device)


@pytest.mark.parametrize("device", DEVICES)
def test_concat_of_many_tensors_fits_the_binding_limit(device):
    rng = np.random.default_rng(5)
    inputs = {f"x{n}": normal(rng, 2, n + 1) for n in range(9)}
    check(
        lambda *xs: F.cat(list(xs), 1),
        lambda *xs: torch.cat(list(xs), 1),
        inputs,
        device,
    )


@pytest.mark.parametrize("device", DEVICES)
def test_stack_split_and_chunk_match_torch(device):
    rng = np.random.default_rng(6)
    x, y = normal(rng, 7, 3), normal(rng, 7, 3)
    check(
        lambda x, y: F.stack([x, y], 1).split([2, 4, 1]),
        lambda x, y: torch.stack([x, y], 1).split([2, 4, 1]),
        {"x": x, "y": y},
        device,
    )
    if device == "cpu":
        check(lambda x: x.split(3, 0), lambda x: x.split(3, 0), {"x": x}, device)
        check(lambda x: x.chunk(2, 1), lambda x: x.chunk(2, 1), {"x": x}, device)


@pytest.mark.parametrize("device", DEVICES)
def test_repeat_tile_and_expand_match_torch(device):
    x = normal(np.random.default_rng(7), 3, 1, 2)
    check(lambda x: x.repeat(2, 1, 4, 3), lambda x: x.repeat(2, 1, 4, 3), {"x": x}, device)
    if device == "cpu":
        check(lambda x: F.tile(x, (2, 1)), lambda x: torch.tile(x, (2, 1)), {"x": x}, device)
        check(lambda x: x.expand(2, -1, 5, -1), lambda x: x.expand(2, -1, 5, -1), {"x": x}, device)


@pytest.mark.parametrize("device", DEVICES)
def test_views_of_other_dtypes(device):
    graph = mn.Graph()
    i = graph.input("i", (2, 3), "i32")
    b = graph.input("b", (2, 3), "bool")
    graph.output("i_out", F.cat([F.pad(i, (1, 0), value=7), i.flip(0)], 1))
    graph.output("b_out", F.pad(b[:, ::2], (0, 2), value=True))
    ints = np.array([[1, -2, 3], [4, 5, -6]], np.int32)
    bools = np.array([[True, False, False], [False, True, False]])
    got = mn.build(graph, device=device).run({"i": ints, "b": bools})
    expected = np.concatenate([np.pad(ints, ((0, 0), (1, 0)), constant_values=7), ints[::-1]], 1)
    np.testing.assert_array_equal(got["i_out"], expected)
    np.testing.assert_array_equal(
        got["b_out"], np.pad(bools[:, ::2], ((0, 0), (0, 2)), constant_values=True)
    )


def test_views_fuse_into_one_kernel():
    graph = mn.Graph()
    x = graph.input("x", (4, 6))
    y = F.cat([F.pad(x[1:, ::2], (1, 0)), x.flip(0)[:3, :4]], 1).repeat(2, 1).exp()
    graph.output("y", y)
    assert kernels_of(graph, y) == ["pointwise"]


@pytest.mark.parametrize("device", DEVICES)
def test_matmul_reads_a_slice_in_place(device):
    # The slice's offset and strides go straight into the matmul kernel: no copy.
    graph = mn.Graph()
    a = graph.input("a", (5, 9))
    b = graph.input("b", (7, 3))
    y = graph.output("y", a[1:4, 2::3] @ b[1::2])
    assert kernels_of(graph, y) == ["matmul"]
    rng = np.random.default_rng(8)
    av, bv = normal(rng, 5, 9), normal(rng, 7, 3)
    got = mn.build(graph, device=device).run({"a": av, "b": bv})["y"]
    np.testing.assert_allclose(got, av[1:4, 2::3] @ bv[1::2], rtol=1e-5, atol=1e-6)


# -- gather, index_select, embedding ------------------------------------------------------------


# Index dims may be smaller than x's off the axis; repeated indices accumulate.
@pytest.mark.parametrize(
    ("device", "case"), device_cases([(1, (4, 7, 3)), (0, (2, 5, 1)), (-1, (3, 2, 6))])
)
def test_gather_matches_torch(device, case):
    axis, shape = case
    rng = np.random.default_rng(9)
    x = normal(rng, 4, 5, 3)
    index = rng.integers(0, x.shape[axis], shape).astype(np.int32)
    check(
        lambda x, i: x.gather(axis, i),
        lambda x, i: torch.gather(x, axis, i),
        {"x": x, "i": index},
        device,
    )


@pytest.mark.parametrize(("device", "case"), device_cases([(1, 9), (0, 1), (2, 4)]))
def test_index_select_matches_torch(device, case):
    axis, count = case
    rng = np.random.default_rng(10)
    x = normal(rng, 3, 6, 2)
    index = rng.integers(0, x.shape[axis], count).astype(np.int32)
    check(
        lambda x, i: F.index_select(x, axis, i),
        lambda x, i: torch.index_select(x, axis, i),
        {"x": x, "i": index},
        device,
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("vocab", "dim", "ids_shape"), [(11, 600, (70,)), (5, 3, (2, 4)), (1, 1, ())]
)
def test_embedding_matches_torch(vocab, dim, ids_shape, device):
    # 600 columns and 70 ids exercise several column blocks and index chunks of the kernel.
    rng = np.random.default_rng(11)
    table = normal(rng, vocab, dim)
    ids = rng.integers(0, vocab, ids_shape).astype(np.int32)
    check(F.embedding, lambda t, i: TF.embedding(i, t), {"table": table, "ids": ids}, device)


def test_embedding_gradient_is_deterministic_index_add():
    graph = mn.Graph()
    table = graph.input("table", (10, 4))
    ids = graph.input("ids", (3, 2), "i32")
    (g,) = mn.grad(F.embedding(table, ids).sum(), [table])
    assert g.node.op == "index_add"
    assert kernels_of(graph, g) == ["index_add"]


# -- errors -----------------------------------------------------------------------------------


def test_bad_views_raise_at_build_time():
    graph = mn.Graph()
    x = graph.input("x", (3, 4))
    i = graph.input("i", (2,), "i32")
    with pytest.raises(IndexError, match="index 3 is out of range for axis 0 of size 3"):
        x[3]
    with pytest.raises(IndexError, match=r"too many indices for f32\[3, 4\]"):
        x[0, 0, 0]
    with pytest.raises(IndexError, match=r"slice\(2, 2, None\) of axis 1 \(size 4\) is empty"):
        x[:, 2:2]
    with pytest.raises(IndexError, match="index tensor must be i32 or u32"):
        x[graph.input("f", (2,))]
    with pytest.raises(ValueError, match=r"slice: axis 1 of f32\[3, 4\]: stop 9 is out of range"):
        x.graph.apply("slice", [x], stops=[None, 9])
    with pytest.raises(ValueError, match="step 0 must be a positive integer"):
        x.graph.apply("slice", [x], steps=[0, None])
    with pytest.raises(ValueError, match="flip: axis 2 is out of range for 2 dims"):
        x.flip(2)
    with pytest.raises(ValueError, match=r"flip: axes \[0, -2\] of f32\[3, 4\] repeat an axis"):
        x.flip(0, -2)
    with pytest.raises(ValueError, match=r"pad: pads \[1, 2, 3\] must hold \(before, after\)"):
        F.pad(x, (1, 2, 3))
    with pytest.raises(
        ValueError, match=r"pad: padding \(-2, -2\) of axis 0 of f32\[3, 4\] leaves nothing"
    ):
        F.pad(x, (0, 0, -2, -2))
    with pytest.raises(ValueError, match="pad: mode 'reflect' is not supported"):
        F.pad(x, (1, 1), mode="reflect")
    with pytest.raises(ValueError, match=r"pad: value 0.5 does not fit a i32 tensor"):
        F.pad(i, (1, 1), value=0.5)
    with pytest.raises(ValueError, match="concat along axis 0: tensor 1 is f32\\[2, 3\\]"):
        F.cat([x, graph.input("y", (2, 3))])
    with pytest.raises(TypeError, match="concat: tensor 1 is i32\\[2\\], tensor 0 is f32"):
        F.cat([x[0, :2], i])
    with pytest.raises(ValueError, match=r"split: sections \[1, 1\] must be positive and sum to 3"):
        x.split([1, 1])
    with pytest.raises(ValueError, match=r"repeat: 1 sizes \[2\] cannot cover the 2 dims"):
        x.repeat(2)
    with pytest.raises(ValueError, match="expand: -1 is not allowed for the new leading dim 0"):
        x.expand(-1, 3, 4)
    with pytest.raises(TypeError, match=r"gather: index must be i32 or u32, got f32\[3, 4\]"):
        x.gather(0, x)
    with pytest.raises(ValueError, match="gather: index i32\\[2\\] must have the dims of x"):
        x.gather(0, i)
    with pytest.raises(ValueError, match="index_select: index must be 1-D"):
        x.index_select(0, graph.input("i2", (2, 2), "i32"))
    with pytest.raises(ValueError, match="index_select: axis -3 is out of range for 2 dims"):
        x.index_select(-3, i)
    with pytest.raises(TypeError, match="embedding: ids must be i32 or u32"):
        F.embedding(x, x)


def test_out_of_range_indices_raise_on_the_numpy_executor():
    # Fed indices are checked when fed (the session names the input); indices the graph
    # computes are checked by the NumPy executor's reference as it runs the op.
    graph = mn.Graph()
    x = graph.input("x", (3, 2))
    i = graph.input("i", (2,), "i32")
    graph.output("y", x.index_select(0, i))
    with pytest.raises(IndexError, match=r"input 'i': value 3 at \[1\] .*valid: 0\.\.2\)"):
        mn.build(graph, device="cpu").run({"x": np.zeros((3, 2), np.float32), "i": [0, 3]})
    graph = mn.Graph()
    x = graph.input("x", (3, 2))
    i = graph.input("i", (2,), "i32")
    graph.output("y", x.index_select(0, i + 1))
    with pytest.raises(IndexError, match="index_select: index 3 is out of range for size 3"):
        mn.build(graph, device="cpu").run({"x": np.zeros((3, 2), np.float32), "i": [0, 2]})
