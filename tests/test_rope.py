"""Rotary position embedding against straightforward PyTorch versions of Hugging Face's
rotate_half formula and of GPT-J's interleaved one."""

import numpy as np
import pytest
import torch

import meganeura as mn
from meganeura import functional as F
from meganeura.lower.plan import plan
from meganeura.ops.rope import rope_frequencies
from tests.torch_check import DEVICES, check, normal


def hf_inv_freq(rotary_dim: int, theta: float) -> torch.Tensor:
    """As transformers' default rope initialization computes it (float32)."""
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim
    return 1.0 / (theta**exponents)


def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def rotate_every_two(x):
    x1, x2 = x[..., ::2], x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def torch_rope(x, positions, inv_freq, interleaved):
    """x [B, H, T, D] (float64), positions [T] or [B, T]; the first 2 * len(inv_freq) features
    rotate. The angle is a float32 product, as in transformers."""
    rotary_dim = 2 * inv_freq.shape[0]
    freqs = positions.float()[..., None] * inv_freq  # [(B,) T, R / 2]
    if interleaved:
        emb = freqs.repeat_interleave(2, dim=-1)
    else:
        emb = torch.cat((freqs, freqs), dim=-1)
    emb = emb.double()
    cos, sin = emb.cos(), emb.sin()
    if positions.ndim == 2:
        cos, sin = cos[:, None], sin[:, None]
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    turn = rotate_every_two if interleaved else rotate_half
    return torch.cat((rot * cos + turn(rot) * sin, rest), dim=-1)


# (x shape [B, H, T, D], positions shape, rotary_dim, interleaved, theta, largest position)
CASES = [
    ((2, 3, 5, 8), (2, 5), None, False, 10000.0, 100),
    ((2, 3, 5, 8), (2, 5), None, True, 10000.0, 100),
    ((1, 2, 3, 10), (3,), 4, False, 10000.0, 50),
    ((2, 1, 4, 12), (2, 4), 6, True, 10000.0, 50),
    ((1, 2, 1, 6), (1,), None, False, 500000.0, 30000),  # one decoding step, far position
    ((3, 1, 2, 2), (3, 2), None, False, 10.0, 7),
]


def device_cases(items):
    params = [pytest.param("cpu", item, id=f"cpu-{n}") for n, item in enumerate(items)]
    lavapipe = [0, 3, 4]  # half-split, partial interleaved, a far position
    return params + [
        pytest.param("vulkan-cpu", items[n], marks=pytest.mark.lavapipe, id=f"vk-{n}")
        for n in lavapipe
    ]


@pytest.mark.parametrize(("device", "case"), device_cases(CASES))
def test_rope_matches_torch(device, case):
    shape, pos_shape, rotary_dim, interleaved, theta, largest = case
    rng = np.random.default_rng(0)
    x = normal(rng, *shape)
    positions = rng.integers(0, largest + 1, pos_shape).astype(np.int32)
    inv_freq = hf_inv_freq(rotary_dim or shape[-1], theta)

    def ours(x, positions):
        return F.rope(
            x, positions, rotary_dim=rotary_dim, interleaved=interleaved, inv_freq=inv_freq.numpy()
        )

    check(
        ours,
        lambda x, positions: torch_rope(x, positions, inv_freq, interleaved),
        {"x": x, "positions": positions},
        device,
        atol=2e-5,
    )


def test_default_frequencies_are_transformers_float32_ones():
    for dim, theta in ((8, 10000.0), (64, 10000.0), (128, 500000.0)):
        ours = rope_frequencies(dim, theta)
        np.testing.assert_allclose(ours, hf_inv_freq(dim, theta).numpy(), rtol=2e-7)


@pytest.mark.parametrize("device", DEVICES)
def test_rope_with_theta_and_positions_offset(device):
    # Decoding at an offset is rope at other positions: here [T] positions 40..42.
    rng = np.random.default_rng(1)
    x = normal(rng, 2, 2, 3, 16)
    positions = np.arange(40, 43, dtype=np.int32)
    inv_freq = hf_inv_freq(16, 10000.0)
    check(
        lambda x, p: F.rope(x, p, theta=10000.0),
        lambda x, p: torch_rope(x, p, inv_freq, False),
        {"x": x, "positions": positions},
        device,
        atol=2e-5,
    )


def test_rope_is_fused_into_its_reader_and_its_gradient_is_the_inverse_rotation():
    graph = mn.Graph()
    x = graph.input("x", (1, 2, 4, 8))
    positions = graph.input("p", (4,), "i32")
    y = graph.output("y", F.rope(x.exp(), positions) * 3.0)
    assert [k.kind for k in plan(graph, [y.id], {}).kernels] == ["pointwise"]
    (g,) = mn.grad(F.rope(x, positions).sum(), [x])
    assert g.node.op == "rope"
    freq_fwd = graph.nodes[graph.nodes[g.id].inputs[2]]
    assert freq_fwd.op == "neg"


def test_bad_rope_arguments_raise_at_build_time():
    graph = mn.Graph()
    x = graph.input("x", (2, 3, 5, 8))
    p = graph.input("p", (5,), "i32")
    with pytest.raises(ValueError, match=r"rope: x must be a float tensor \[B, H, T, D\]"):
        F.rope(graph.input("x3", (3, 5, 8)), p)
    with pytest.raises(TypeError, match=r"rope: positions must be i32 or u32, got f32\[5\]"):
        F.rope(x, graph.input("pf", (5,)))
    with pytest.raises(ValueError, match=r"rope: positions must be \[T\] = \[5\] or \[B, T\]"):
        F.rope(x, graph.input("p4", (4,), "i32"))
    with pytest.raises(ValueError, match=r"rope: rotary_dim must be even and in 2\.\.8"):
        F.rope(x, p, rotary_dim=5)
    with pytest.raises(ValueError, match=r"rope: rotary_dim must be even and in 2\.\.8"):
        F.rope(x, p, rotary_dim=10)
    with pytest.raises(ValueError, match="rope: rotary_dim 4 disagrees with inv_freq"):
        F.rope(x, p, rotary_dim=4, inv_freq=np.ones(3, np.float32))
