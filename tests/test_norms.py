"""rms_norm, layer_norm, group_norm and batch_norm (functional and nn blocks) against PyTorch."""

import numpy as np
import pytest
import torch
import torch.nn.functional as TF

import meganeura as mn
from meganeura import functional as F
from meganeura import nn, optim
from meganeura.lower.plan import plan
from tests.torch_check import DEVICES, check, normal


def device_cases(items):
    """Every case on the NumPy executor, the first on lavapipe (pipelines compile slowly)."""
    params = [pytest.param("cpu", item, id=f"cpu-{n}") for n, item in enumerate(items)]
    return [*params, pytest.param("vulkan-cpu", items[0], marks=pytest.mark.lavapipe, id="vk-0")]


def hf_rms_norm(x, weight, eps):
    """Hugging Face LlamaRMSNorm."""
    variance = x.pow(2).mean(-1, keepdim=True)
    out = x * torch.rsqrt(variance + eps)
    return out if weight is None else weight * out


# (shape, with weight): 1030 columns use the kernel's 256-wide workgroups; one column too.
RMS_CASES = [((3, 2, 37), True), ((2, 1030), True), ((4, 5), False), ((3, 1), True), ((6,), True)]


@pytest.mark.parametrize(("device", "case"), device_cases(RMS_CASES))
def test_rms_norm_matches_hf(device, case):
    shape, with_weight = case
    rng = np.random.default_rng(0)
    inputs = {"x": normal(rng, *shape, scale=2.0)}
    if with_weight:
        inputs["w"] = normal(rng, shape[-1])
    check(
        lambda x, w=None: F.rms_norm(x, w, 1e-6),
        lambda x, w=None: hf_rms_norm(x, w, 1e-6),
        inputs,
        device,
    )


@pytest.mark.lavapipe
def test_rms_norm_wide_rows_on_lavapipe():
    x = normal(np.random.default_rng(1), 2, 1030, scale=3.0) + 1.0
    w = normal(np.random.default_rng(2), 1030)
    check(
        lambda x, w: F.rms_norm(x, w, 1e-5),
        lambda x, w: hf_rms_norm(x, w, 1e-5),
        {"x": x, "w": w},
        "vulkan-cpu",
    )


# (shape, weight, bias); a large mean tests the two-pass variance.
LN_CASES = [
    ((3, 2, 37), True, True),
    ((2, 1030), True, True),
    ((4, 5), False, False),
    ((4, 5), True, False),
    ((4, 5), False, True),
    ((1, 1), True, True),
]


@pytest.mark.parametrize(("device", "case"), device_cases(LN_CASES))
def test_layer_norm_matches_torch(device, case):
    shape, with_weight, with_bias = case
    rng = np.random.default_rng(3)
    x = normal(rng, *shape) + 50.0
    w = normal(rng, shape[-1]) if with_weight else None
    b = normal(rng, shape[-1]) if with_bias else None
    inputs = {"x": x, **({"w": w} if with_weight else {}), **({"b": b} if with_bias else {})}

    def build(lib, fn):
        def call(x, *params):
            p = dict(zip([k for k in ("w", "b") if k in inputs], params, strict=True))
            return fn(lib, x, p.get("w"), p.get("b"))

        return call

    check(
        build(F, lambda lib, x, w, b: lib.layer_norm(x, w, b, 1e-5)),
        build(TF, lambda lib, x, w, b: lib.layer_norm(x, (shape[-1],), w, b, 1e-5)),
        inputs,
        device,
        rtol=2e-4,
    )


def test_norms_are_one_kernel_forward_and_row_kernels_backward():
    graph = mn.Graph()
    x = graph.input("x", (4, 16))
    w = graph.input("w", (16,))
    b = graph.input("b", (16,))
    y = F.layer_norm(x.exp(), w, b)
    assert [k.kind for k in plan(graph, [y.id], {}).kernels] == ["norm"]
    dx, dw, db = mn.grad((y * y).sum(), [x, w, b])
    kinds = [k.kind for k in plan(graph, [dx.id, dw.id, db.id], {}).kernels]
    assert kinds.count("norm") == 2  # the forward (read by the loss) and the input gradient
    # dx = layer_norm_grad * exp(x): the chain rule's multiply runs in the norm's store.
    (kernel,) = [k for k in plan(graph, [dx.id], {}).kernels if k.node == dx.id]
    assert kernel.kind == "norm" and graph.nodes[kernel.core].op == "layer_norm_grad"


GROUP_CASES = [
    ((2, 6, 3, 4), 3, True),
    ((3, 4, 5), 1, True),
    ((2, 4), 4, False),
    ((1, 6, 7), 2, True),
]


@pytest.mark.parametrize(("device", "case"), device_cases(GROUP_CASES))
def test_group_norm_matches_torch(device, case):
    shape, groups, affine = case
    rng = np.random.default_rng(4)
    inputs = {"x": normal(rng, *shape, scale=2.0)}
    if affine:
        inputs.update(w=normal(rng, shape[1]), b=normal(rng, shape[1]))
    check(
        lambda x, *p: F.group_norm(x, groups, *p),
        lambda x, *p: TF.group_norm(x, groups, *p),
        inputs,
        device,
        rtol=2e-4,
    )


@pytest.mark.parametrize(("device", "shape"), device_cases([(4, 3, 5, 2), (5, 3), (2, 2, 7)]))
def test_batch_norm_training_matches_torch(device, shape):
    rng = np.random.default_rng(5)
    inputs = {
        "x": normal(rng, *shape) + 1.0,
        "w": normal(rng, shape[1]),
        "b": normal(rng, shape[1]),
    }
    check(
        lambda x, w, b: F.batch_norm(x, None, None, w, b, training=True),
        lambda x, w, b: TF.batch_norm(x, None, None, w, b, training=True),
        inputs,
        device,
        rtol=2e-4,
    )


@pytest.mark.parametrize("device", DEVICES)
def test_batch_norm_eval_uses_running_statistics(device):
    rng = np.random.default_rng(6)
    mean, var = normal(rng, 3), np.abs(normal(rng, 3)) + 0.5

    def ours(x, w, b):
        stats = [x.graph.constant(mean), x.graph.constant(var)]
        return F.batch_norm(x, *stats, w, b, training=False, eps=1e-3)

    def reference(x, w, b):
        m, v = torch.from_numpy(mean).double(), torch.from_numpy(var).double()
        return TF.batch_norm(x, m, v, w, b, training=False, eps=1e-3)

    inputs = {"x": normal(rng, 2, 3, 4), "w": normal(rng, 3), "b": normal(rng, 3)}
    check(ours, reference, inputs, device)


@pytest.mark.parametrize("device", DEVICES)
def test_batch_norm_2d_updates_running_statistics_like_torch(device):
    graph = mn.Graph()
    x = graph.input("x", (4, 3, 2, 5))
    layer = nn.BatchNorm2d(graph, "bn", 3, momentum=0.3)
    y = graph.output("y", layer(x))
    session = mn.build(graph, (y * y).mean(), optim.SGD(lr=0.1), device=device)
    reference = torch.nn.BatchNorm2d(3, momentum=0.3)
    torch_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    rng = np.random.default_rng(7)
    for _ in range(3):
        batch = normal(rng, 4, 3, 2, 5, scale=2.0) + 0.5
        session.step({"x": batch})
        torch_opt.zero_grad()
        out = reference(torch.from_numpy(batch))
        (out * out).mean().backward()
        torch_opt.step()
    params = session.parameters()
    for name in ("weight", "bias", "running_mean", "running_var"):
        np.testing.assert_allclose(
            params[f"bn.{name}"],
            getattr(reference, name).detach().numpy(),
            rtol=1e-5,
            atol=1e-6,
            err_msg=name,
        )
    # Eval mode in a second graph reads the trained running statistics.
    eval_graph = mn.Graph()
    ex = eval_graph.input("x", (2, 3, 2, 5))
    eval_graph.output("y", nn.BatchNorm2d(eval_graph, "bn", 3).eval()(ex))
    evaluation = mn.build(eval_graph, device=device)
    evaluation.set_parameters(params)
    batch = normal(rng, 2, 3, 2, 5)
    reference.eval()
    np.testing.assert_allclose(
        evaluation.run({"x": batch})["y"],
        reference(torch.from_numpy(batch)).detach().numpy(),
        rtol=1e-5,
        atol=1e-5,
    )


def test_norm_layers_match_torch_modules():
    rng = np.random.default_rng(8)
    graph = mn.Graph()
    x = graph.input("x", (2, 4, 3, 3))
    ids = graph.input("ids", (2, 5), "i32")
    blocks = {
        "ln": (nn.LayerNorm(graph, "ln", 3), torch.nn.LayerNorm(3)),
        "rms": (nn.RMSNorm(graph, "rms", 3, eps=1e-6), torch.nn.RMSNorm(3, eps=1e-6)),
        "gn": (nn.GroupNorm(graph, "gn", 2, 4), torch.nn.GroupNorm(2, 4)),
    }
    for name, (block, _) in blocks.items():
        graph.output(name, block(x))
    embed = nn.Embedding(graph, "emb", 7, 3)
    graph.output("emb", embed(ids))
    session = mn.build(graph, device="cpu")
    params = session.parameters()
    assert sorted(params) == sorted(
        ["ln.weight", "ln.bias", "rms.weight", "gn.weight", "gn.bias", "emb.weight"]
    )
    # Initialization as in torch: ones and zeros; N(0, 1) embeddings.
    assert np.all(params["ln.weight"] == 1) and np.all(params["gn.bias"] == 0)
    assert 0.5 < params["emb.weight"].std() < 1.5
    new = {name: normal(rng, *value.shape) for name, value in params.items()}
    session.set_parameters(new)
    xv = normal(rng, 2, 4, 3, 3)
    idv = rng.integers(0, 7, (2, 5)).astype(np.int32)
    got = session.run({"x": xv, "ids": idv})
    for name, (_, module) in blocks.items():
        module.load_state_dict(
            {
                k.removeprefix(f"{name}."): torch.from_numpy(v)
                for k, v in new.items()
                if k.startswith(f"{name}.")
            }
        )
        np.testing.assert_allclose(
            got[name], module(torch.from_numpy(xv)).detach().numpy(), rtol=1e-4, atol=1e-5
        )
    np.testing.assert_array_equal(got["emb"], new["emb.weight"][idv])


def test_bad_norm_arguments_raise_at_build_time():
    graph = mn.Graph()
    x = graph.input("x", (2, 6, 3))
    w5 = graph.input("w5", (5,))
    with pytest.raises(ValueError, match=r"rms_norm: weight must be f32\[3\] \(the last dim of x"):
        F.rms_norm(x, w5)
    with pytest.raises(ValueError, match=r"layer_norm: bias must be f32\[3\]"):
        F.layer_norm(x, None, w5)
    with pytest.raises(ValueError, match="rms_norm: eps must be a finite number >= 0, got -1"):
        F.rms_norm(x, eps=-1)
    with pytest.raises(
        ValueError, match="group_norm: num_groups=4 must be a positive divisor of the 6"
    ):
        F.group_norm(x, 4)
    with pytest.raises(ValueError, match=r"group_norm: weight must be f32\[6\] \(one per channel"):
        F.group_norm(x, 3, w5)
    with pytest.raises(ValueError, match="GroupNorm 'g': num_groups=4 must be a positive divisor"):
        nn.GroupNorm(graph, "g", 4, 6)
    with pytest.raises(
        ValueError, match=r"batch_norm: training needs more than one value per channel"
    ):
        F.batch_norm(graph.input("one", (1, 6)), None, None, training=True)
    with pytest.raises(
        ValueError, match=r"batch_norm: evaluation \(training=False\) needs running statistics"
    ):
        F.batch_norm(x, None, None)
    with pytest.raises(ValueError, match=r"batch_norm: running_mean must be f32\[6\]"):
        F.batch_norm(x, w5, w5, training=True)
    with pytest.raises(ValueError, match=r"BatchNorm2d 'bn': expects \[N, C, H, W\]"):
        nn.BatchNorm2d(graph, "bn", 6)(x)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", ["rms_norm", "layer_norm"])
def test_residual_gradients_added_in_the_norm_backward_match_torch(device, op):
    # A pre-norm residual block: x's gradient is the norm's dx plus the residual path's, the
    # add running in the norm-gradient kernel's store.
    def block(x, w, v):
        h = F.rms_norm(x, w) if op == "rms_norm" else F.layer_norm(x, w)
        return (x + h * v).tanh()

    def torch_block(x, w, v):
        if op == "rms_norm":
            h = hf_rms_norm(x, w, 1e-6)
        else:
            h = TF.layer_norm(x, (x.shape[-1],), w)
        return (x + h * v).tanh()

    rng = np.random.default_rng(9)
    inputs = {"x": normal(rng, 3, 5, 37), "w": normal(rng, 37), "v": normal(rng, 37)}
    check(block, torch_block, inputs, device)
    graph = mn.Graph()
    x, w, v = (graph.input(n, a.shape) for n, a in inputs.items())
    (dx,) = mn.grad(block(x, w, v).sum(), [x])
    (kernel,) = [k for k in plan(graph, [dx.id], {}).kernels if k.node == dx.id]
    assert graph.nodes[kernel.core].op == f"{op}_grad"
