"""Attention against PyTorch: forward and gradients of q, k, v (and a trained mask)."""

import contextlib
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from meganeura import Graph, build, grad
from meganeura import functional as F
from meganeura.backends.wgsl import attention_rows, attention_team
from meganeura.backends.wgsl.attention_rows import RowsLayout, forward_layout
from meganeura.backends.wgsl.attention_team import TeamLayout, team_layout
from meganeura.backends.wgsl.kernels import generate
from meganeura.lower.plan import plan as make_plan
from meganeura.ops import all_ops
from meganeura.ops.attention import attention
from meganeura.ops.packed import segment
from tests.harness import check_finite_differences, normal, op_graph

LAVAPIPE = pytest.param("vulkan-cpu", marks=pytest.mark.lavapipe)
GPU = pytest.param("gpu", marks=pytest.mark.gpu)


def allowed(tq: int, tk: int, causal: bool, window: int) -> torch.Tensor:
    """Bottom-right aligned causal and sliding-window masks, True where a key is visible."""
    dist = torch.arange(tq)[:, None] + (tk - tq) - torch.arange(tk)[None, :]
    ok = torch.ones(tq, tk, dtype=torch.bool)
    if causal:
        ok &= dist >= 0
    if window:
        ok &= dist.abs() < window
    return ok


NEVER = 10**9
# Settings of attention_rows' (FEW_QUERIES, FILL_WORKGROUPS, SPLIT_BLOCKS) and attention_team's
# (MIN_QUERIES, MAX_KEYS) that force each forward kernel on small shapes.
FORWARDS = {
    "blocks": (0, 0, NEVER, NEVER, 0),  # the 64-query block kernel
    "rows": (NEVER, NEVER, NEVER, NEVER, 0),  # the few-rows kernel, one query per workgroup
    # the few-rows kernel, as many queries per workgroup as fit
    "rows_packed": (NEVER, 1, NEVER, NEVER, 0),
    # the few-rows kernel with the keys split over workgroups, one 64-key block each, and a
    # second dispatch combining them
    "rows_split": (NEVER, NEVER, 1, NEVER, 0),
    "team": (NEVER, NEVER, NEVER, 1, NEVER),  # a team of lanes per row, any query count
}


@contextlib.contextmanager
def forward_kernel(name: str | None):
    """Within the block, attention forwards use the kernel FORWARDS[name] forces (with None,
    the one chosen by shape)."""
    with pytest.MonkeyPatch.context() as patch:
        if name is not None:
            few, fill, split, min_queries, max_keys = FORWARDS[name]
            patch.setattr(attention_rows, "FEW_QUERIES", few)
            patch.setattr(attention_rows, "FILL_WORKGROUPS", fill)
            patch.setattr(attention_rows, "SPLIT_BLOCKS", split)
            patch.setattr(attention_team, "MIN_QUERIES", min_queries)
            patch.setattr(attention_team, "MAX_KEYS", max_keys)
        yield


# (device, forward kernel): the NumPy executor once, the WebGPU devices with each kernel.
DEVICE_KERNELS = [("cpu", None)] + [
    pytest.param(device.values[0], name, marks=device.marks, id=f"{device.values[0]}-{name}")
    for device in (LAVAPIPE, GPU)
    for name in sorted(FORWARDS)
]


def torch_logits(q, k, mask, causal, window, softcap, scale):
    """[B, Hq, Tq, Tk] logits, -inf where a key is not visible."""
    k = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
    s = q @ k.transpose(-1, -2) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    if mask is not None:
        s = s + mask
    return s.masked_fill(~allowed(q.shape[2], k.shape[2], causal, window), -math.inf)


def torch_attention(q, k, v, mask, causal, window, softcap, scale):
    """torch's SDPA where it covers the case; explicit softmax for soft-capping."""
    group = q.shape[1] // k.shape[1]
    if not softcap:
        visible = allowed(q.shape[2], k.shape[2], causal, window)
        bias = torch.zeros(visible.shape).masked_fill(~visible, -math.inf)
        if mask is not None:
            bias = bias + mask
        return torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, scale=scale, enable_gqa=group > 1
        )
    p = torch.softmax(torch_logits(q, k, mask, causal, window, softcap, scale), dim=-1)
    return p @ v.repeat_interleave(group, 1)


def run_case(
    device,
    B,
    Hq,
    Hkv,
    Tq,
    Tk,
    D,
    Dv,
    causal=False,
    window=0,
    softcap=0.0,
    mask_shape=None,
    scale=None,
    seed=0,
):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, Hq, Tq, D)).astype(np.float32)
    k = rng.standard_normal((B, Hkv, Tk, D)).astype(np.float32)
    v = rng.standard_normal((B, Hkv, Tk, Dv)).astype(np.float32)
    mask = rng.standard_normal(mask_shape).astype(np.float32) if mask_shape else None
    upstream = rng.standard_normal((B, Hq, Tq, Dv)).astype(np.float32)

    g = Graph()
    tq, tk, tv = (g.parameter(n, a.shape, init=a) for n, a in (("q", q), ("k", k), ("v", v)))
    tm = g.parameter("mask", mask.shape, init=mask) if mask is not None else None
    up = g.input("up", upstream.shape)
    out = g.output(
        "out",
        F.scaled_dot_product_attention(
            tq, tk, tv, tm, is_causal=causal, scale=scale, window=window, softcap=softcap
        ),
    )
    wrt = [tq, tk, tv] + ([tm] if tm is not None else [])
    for name, t in zip(("dq", "dk", "dv", "dmask"), grad((out * up).sum(), wrt), strict=False):
        g.output(name, t)
    got = build(g, device=device).run({"up": upstream})

    ref = [torch.tensor(a, requires_grad=True) for a in (q, k, v)]
    ref_mask = torch.tensor(mask, requires_grad=True) if mask is not None else None
    ref_out = torch_attention(
        *ref, ref_mask, causal, window, softcap, scale if scale is not None else 1 / math.sqrt(D)
    )
    ref_out.backward(torch.tensor(upstream))
    want = {"out": ref_out, "dq": ref[0].grad, "dk": ref[1].grad, "dv": ref[2].grad}
    if ref_mask is not None:
        want["dmask"] = ref_mask.grad
    for name, expected in want.items():
        np.testing.assert_allclose(
            got[name], expected.detach().numpy(), rtol=2e-4, atol=2e-5, err_msg=name
        )


CASES = {
    "mha_full": dict(B=2, Hq=2, Hkv=2, Tq=7, Tk=7, D=8, Dv=8),
    "mha_causal": dict(B=1, Hq=2, Hkv=2, Tq=9, Tk=9, D=16, Dv=16, causal=True),
    "gqa_causal_kv_cache": dict(B=2, Hq=4, Hkv=2, Tq=3, Tk=11, D=8, Dv=8, causal=True),
    "mqa_cross": dict(B=1, Hq=3, Hkv=1, Tq=5, Tk=13, D=4, Dv=12),
    "window_causal": dict(B=1, Hq=2, Hkv=1, Tq=12, Tk=12, D=8, Dv=8, causal=True, window=4),
    "window_symmetric": dict(B=1, Hq=2, Hkv=2, Tq=10, Tk=10, D=8, Dv=8, window=3),
    "softcap": dict(B=1, Hq=2, Hkv=1, Tq=6, Tk=6, D=8, Dv=8, causal=True, softcap=2.0),
    "mask_trained": dict(B=2, Hq=2, Hkv=1, Tq=5, Tk=6, D=8, Dv=8, mask_shape=(2, 1, 5, 6)),
    "mask_2d_scale": dict(B=1, Hq=2, Hkv=2, Tq=4, Tk=6, D=8, Dv=8, mask_shape=(4, 6), scale=0.3),
    "decode_one_query": dict(B=2, Hq=4, Hkv=1, Tq=1, Tk=9, D=8, Dv=8, causal=True),
    "all_features": dict(
        B=1,
        Hq=4,
        Hkv=2,
        Tq=6,
        Tk=10,
        D=8,
        Dv=8,
        causal=True,
        window=5,
        softcap=3.0,
        mask_shape=(1, 4, 1, 10),
    ),
}


@pytest.mark.parametrize("device", ["cpu", GPU])
@pytest.mark.parametrize("case", sorted(CASES))
def test_attention_matches_torch(device, case):
    run_case(device, **CASES[case])


# Each configuration compiles three large kernels on lavapipe: the cases that reach every
# branch of the generators, at sizes past one 64-row block and not multiples of it.
LAVAPIPE_CASES = {
    "gqa_causal_kv_cache_blocks": dict(B=1, Hq=4, Hkv=2, Tq=67, Tk=130, D=20, Dv=20, causal=True),
    "mqa_decode_mask_trained": dict(
        B=2, Hq=2, Hkv=1, Tq=1, Tk=70, D=8, Dv=12, mask_shape=(2, 1, 1, 70)
    ),
    "window_symmetric_softcap_blocks": dict(
        B=1, Hq=1, Hkv=1, Tq=70, Tk=70, D=8, Dv=8, window=40, softcap=2.0
    ),
}


@pytest.mark.parametrize("forward", sorted(FORWARDS))
@pytest.mark.parametrize("device", [LAVAPIPE, GPU])
@pytest.mark.parametrize("case", sorted(LAVAPIPE_CASES))
def test_attention_blocks_match_torch(device, case, forward):
    with forward_kernel(forward):
        run_case(device, **LAVAPIPE_CASES[case])


@st.composite
def attention_cases(draw):
    """Few-query shapes (Tq 1..20) with every attribute: GQA/MQA, size-1 dims, key counts
    across 64-key blocks, Dv != D, masks broadcast along any dims, window, causal, softcap."""
    hkv = draw(st.integers(1, 2))
    case = dict(
        B=draw(st.integers(1, 2)),
        Hq=hkv * draw(st.sampled_from([1, 2, 3, 5])),
        Hkv=hkv,
        Tq=draw(st.integers(1, 20)),
        D=draw(st.sampled_from([1, 4, 8, 12, 72])),
        Dv=draw(st.sampled_from([1, 8, 20])),
        causal=draw(st.booleans()),
        window=draw(st.sampled_from([0, 0, 1, 3, 40])),
        softcap=draw(st.sampled_from([0.0, 0.0, 2.0])),
        scale=draw(st.sampled_from([None, 0.4])),
    )
    # At least as many keys as queries, so that every query sees a key when causal.
    case["Tk"] = case["Tq"] + draw(st.sampled_from([0, 1, 7, 50, 75]))
    if draw(st.booleans()):
        full = (case["B"], case["Hq"], case["Tq"], case["Tk"])
        kept = draw(st.lists(st.booleans(), min_size=4, max_size=4))
        shape = tuple(n if keep else 1 for n, keep in zip(full, kept, strict=True))
        case["mask_shape"] = shape[draw(st.integers(0, 2)) :]
    return case


def check_forward(
    device, B, Hq, Hkv, Tq, Tk, D, Dv, causal, window, softcap, scale, mask_shape=None
):
    """The packed output of the attention op -- output rows, then each row's log-sum-exp,
    which the backward kernels read -- against PyTorch."""
    rng = np.random.default_rng(Tq * Tk + D)
    arrays = [
        rng.standard_normal(shape).astype(np.float32)
        for shape in ((B, Hq, Tq, D), (B, Hkv, Tk, D), (B, Hkv, Tk, Dv), mask_shape)
        if shape is not None
    ]
    g = Graph()
    inputs = [g.input(f"x{n}", a.shape) for n, a in enumerate(arrays)]
    attrs = dict(scale=scale, causal=causal, window=window, softcap=softcap)
    g.output("packed", g.apply("attention", inputs, **attrs))
    got = build(g, device=device).run({f"x{n}": a for n, a in enumerate(arrays)})["packed"]
    q, k, v, *mask = (torch.tensor(a) for a in arrays)
    scale = scale if scale is not None else 1 / math.sqrt(D)
    mask = mask[0] if mask else None
    out = torch_attention(q, k, v, mask, causal, window, softcap, scale)
    lse = torch.logsumexp(torch_logits(q, k, mask, causal, window, softcap, scale), dim=-1)
    n = out.numel()
    np.testing.assert_allclose(got[:n], out.numpy().reshape(-1), rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(got[n:], lse.numpy().reshape(-1), rtol=2e-5, atol=2e-5)


@settings(max_examples=25, deadline=None)
@given(case=attention_cases(), seed=st.integers(0, 2**16))
def test_few_query_attention_matches_torch_cpu(case, seed):
    run_case("cpu", **case, seed=seed)
    check_forward("cpu", **case)


# Forward and backward compile five kernels per shape on lavapipe (tens of seconds together);
# the forward alone is one, so it meets more shapes.
@pytest.mark.lavapipe
@settings(max_examples=5, deadline=None)
@given(
    case=attention_cases(), forward=st.sampled_from(["rows", "rows_packed", "rows_split", "team"])
)
def test_few_query_attention_matches_torch_lavapipe(case, forward):
    with forward_kernel(forward):
        run_case("vulkan-cpu", **case)


@pytest.mark.lavapipe
@settings(max_examples=25, deadline=None)
@given(
    case=attention_cases(),
    forward=st.sampled_from([None, "rows", "rows_packed", "rows_split", "team"]),
)
def test_few_query_forward_and_log_sum_exp_lavapipe(case, forward):
    with forward_kernel(forward):
        check_forward("vulkan-cpu", **case)


def _forward_grid(B, Hq, Hkv, Tq, Tk, D, mask=False) -> tuple[int, int, int]:
    g = Graph()
    q, k, v = (
        g.input(n, (B, h, t, D)) for n, h, t in (("q", Hq, Tq), ("k", Hkv, Tk), ("v", Hkv, Tk))
    )
    m = g.input("m", (B, 1, Tq, Tk)) if mask else None
    out = F.scaled_dot_product_attention(q, k, v, m, is_causal=not mask)
    program = make_plan(g, [out.id], {})
    (kernel,) = [kern for kern in program.kernels if g.nodes[kern.node].op == "attention"]
    return generate(program, kernel).grid


def test_forward_kernel_choice():
    # SmolLM2-135M: 9 query heads over 3 kv heads, head dim 64, a 512-slot KV cache.
    # Decode: 3 workgroups would each walk 8 key blocks; 8 splits of one block each, combined.
    assert forward_layout(1, 9, 3, 1, 512, 64, 64) == RowsLayout(3, 1, 64, splits=8)
    assert _forward_grid(1, 9, 3, 1, 512, 64, mask=True) == (8, 3, 1)
    # A short cache (3 blocks) is not worth a second dispatch.
    assert forward_layout(1, 9, 3, 1, 192, 64, 64) == RowsLayout(3, 1, 64)
    # Prefill of 128 tokens: 64-query blocks would give 18 workgroups; the few-rows kernel's
    # 3 x 3 rows give 129, and the team kernel replaces it: a workgroup per query and kv
    # group, each row's keys split over 8 teams of 8 lanes.
    assert forward_layout(1, 9, 3, 128, 512, 64, 64) == RowsLayout(heads=3, queries=3, keys=64)
    assert team_layout(1, 9, 3, 128, 512, 64, 64) == TeamLayout(8, 8, 3, 1, 8)
    assert _forward_grid(1, 9, 3, 128, 512, 64, mask=True) == (128, 3, 1)
    # Decode stays on the few-rows kernel's key splits; so do long caches.
    assert team_layout(1, 9, 3, 1, 512, 64, 64) is None
    assert team_layout(1, 9, 3, 128, 4096, 64, 64) is None
    # Batched chunks of 4 queries (speculative decoding), head dim 128: 4 heads x 2 queries.
    assert forward_layout(64, 32, 8, 4, 4096, 128, 128) == RowsLayout(4, 2, 32)
    # Training-sized: the block kernel launches enough workgroups (8 x 4 x 9 = 288).
    assert forward_layout(4, 9, 3, 512, 512, 64, 64) is None
    assert _forward_grid(4, 9, 3, 512, 512, 64) == (8, 9, 4)
    # Head dims past 256 do not fit the few-rows kernel's staged blocks.
    assert forward_layout(1, 8, 8, 1, 100, 512, 512) is None


@pytest.mark.parametrize(("device", "forward"), DEVICE_KERNELS)
def test_queries_with_no_visible_key_give_zeros(device, forward):
    # Causal with more queries than keys: the first Tq - Tk queries see no key at all.
    rng = np.random.default_rng(1)
    q = rng.standard_normal((1, 1, 5, 4)).astype(np.float32)
    kv = rng.standard_normal((1, 1, 3, 4)).astype(np.float32)
    g = Graph()
    tq, tk = g.parameter("q", q.shape, init=q), g.parameter("k", kv.shape, init=kv)
    out = g.output("out", F.scaled_dot_product_attention(tq, tk, tk, is_causal=True))
    dq, dk = grad(out.sum(), [tq, tk])
    g.output("dq", dq)
    g.output("dk", dk)
    with forward_kernel(forward):
        got = build(g, device=device).run()
    np.testing.assert_array_equal(got["out"][0, 0, :2], 0.0)
    np.testing.assert_array_equal(got["dq"][0, 0, :2], 0.0)
    assert np.all(np.isfinite(got["dk"]))
    ref = [torch.tensor(a, requires_grad=True) for a in (q[:, :, 2:], kv)]
    want = torch_attention(ref[0], ref[1], ref[1], None, True, 0, 0.0, 0.5)
    want.sum().backward()
    np.testing.assert_allclose(got["out"][:, :, 2:], want.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["dk"], ref[1].grad.numpy(), rtol=1e-4, atol=1e-5)


# -- keys hidden by the mask ---------------------------------------------------------------------
#
# A KV cache of fixed capacity hides its unwritten slots (and padding) with -inf; the forward
# kernels skip the key blocks that the mask hides from all of a workgroup's rows. Shapes as
# SmolLM2-135M's: 9 query heads over 3 kv heads, head dim 64.

MASKED_SHAPES = {
    # (B, Tq, Tk); the kernels chosen by shape: decode splits the keys over 5 workgroups of
    # the few-rows kernel; 5 queries and a 128-query prefill run the team kernel.
    "decode": (1, 1, 300),
    "chunk5": (2, 5, 200),
    "prefill": (1, 128, 512),
}


def cache_mask(kind: str, B: int, Hq: int, Tq: int, Tk: int) -> np.ndarray:
    """An additive mask (0 visible, -inf hidden) of `kind`:

    - "cache": a cache filled up to slot `filled`, queries at its end (as generation feeds
      them): keys past each query hidden, [B, 1, Tq, Tk];
    - "left_padding": each batch row's first 70 + 60 b slots hidden, as padding of prompts of
      different lengths, broadcast over queries too: [B, 1, 1, Tk];
    - "hidden_rows": "cache", per head, with query rows (h + i) % 4 == 1 and the last batch
      row's last three heads (a kv group: workgroups that see nothing) hiding every key,
      [B, Hq, Tq, Tk];
    - "finite": "cache" with keys from filled / 2 on at -1e9, a finite value that must still
      be computed; query 0 sees only -1e9 keys.
    """
    filled = Tk * 3 // 5
    visible = np.arange(Tk)[None, :] <= np.arange(filled - Tq, filled)[:, None]  # [Tq, Tk]
    mask = np.where(visible, 0.0, -np.inf).astype(np.float32)
    if kind == "cache":
        return np.broadcast_to(mask, (B, 1, Tq, Tk)).copy()
    if kind == "left_padding":
        keys = np.arange(Tk)[None, None, None, :]
        start = 70 + 60 * np.arange(B)[:, None, None, None]
        return np.where(keys >= start, 0.0, -np.inf).astype(np.float32)
    if kind == "hidden_rows":
        full = np.broadcast_to(mask, (B, Hq, Tq, Tk)).copy()
        heads, queries = np.meshgrid(np.arange(Hq), np.arange(Tq), indexing="ij")
        full[:, (heads + queries) % 4 == 1] = -np.inf
        full[-1, -3:] = -np.inf
        return full
    assert kind == "finite", kind
    mask[:, filled // 2 : filled] = np.where(visible[:, filled // 2 : filled], -1e9, -np.inf)
    mask[0, : filled // 2] = -np.inf
    return np.broadcast_to(mask, (B, 1, Tq, Tk)).copy()


def check_masked_forward(device, B, Hq, Hkv, Tq, Tk, D, mask, causal=False, nan_keys=()):
    """The packed forward output (rows, then log-sum-exp) against PyTorch's SDPA; query rows
    that see no key give 0 and +inf, as the op defines (SDPA gives NaN there). K and V at
    `nan_keys` are NaN: keys the kernels must not read. The reference computes in the
    device's precision: float64 for the NumPy executor, where s - 1e9 keeps s, float32 for
    the kernels, where it rounds to -1e9."""
    rng = np.random.default_rng(Tq * Tk + B)
    q = rng.standard_normal((B, Hq, Tq, D)).astype(np.float32)
    k, v = (rng.standard_normal((B, Hkv, Tk, D)).astype(np.float32) for _ in "kv")
    kn, vn = k.copy(), v.copy()
    kn[:, :, list(nan_keys)] = np.nan
    vn[:, :, list(nan_keys)] = np.nan
    g = Graph()
    inputs = [g.input(n, a.shape) for n, a in zip("qkvm", (q, kn, vn, mask), strict=True)]
    attrs = dict(scale=None, causal=causal, window=0, softcap=0.0)
    g.output("packed", g.apply("attention", inputs, **attrs))
    feeds = dict(zip("qkvm", (q, kn, vn, mask), strict=True))
    got = build(g, device=device).run(feeds)["packed"]

    dtype = torch.float64 if device == "cpu" else torch.float32
    tq, tk, tv, tm = (torch.tensor(a, dtype=dtype) for a in (q, k, v, mask))
    scale = 1 / math.sqrt(D)
    logits = torch_logits(tq, tk, tm, causal, 0, 0.0, scale)
    seen = torch.isfinite(logits).any(-1)  # [B, Hq, Tq]
    out = torch_attention(tq, tk, tv, tm, causal, 0, 0.0, scale)
    out = torch.where(seen[..., None], out, 0.0)
    lse = torch.where(seen, torch.logsumexp(logits, dim=-1), math.inf)
    n = out.numel()
    np.testing.assert_allclose(got[:n], out.numpy().reshape(-1), rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(got[n:], lse.numpy().reshape(-1), rtol=2e-5, atol=2e-5)
    return seen


def masked_kernels(*names: str) -> list:
    """(forward, device): the NumPy executor once, lavapipe with each forward named."""
    return [(None, "cpu")] + [
        pytest.param(name, "vulkan-cpu", marks=pytest.mark.lavapipe, id=f"vulkan-cpu-{name}")
        for name in names
    ]


MASKED_KERNELS = masked_kernels("by_shape", "rows", "rows_packed", "blocks", "team")


@pytest.mark.parametrize("kind", ["cache", "left_padding", "hidden_rows", "finite"])
@pytest.mark.parametrize("shape", ["decode", "chunk5"])
@pytest.mark.parametrize(("forward", "device"), MASKED_KERNELS)
def test_keys_hidden_by_the_mask(forward, device, shape, kind):
    B, Tq, Tk = MASKED_SHAPES[shape]
    with forward_kernel(None if forward == "by_shape" else forward):
        seen = check_masked_forward(device, B, 9, 3, Tq, Tk, 64, cache_mask(kind, B, 9, Tq, Tk))
    if kind == "hidden_rows":
        assert not seen.all() and seen.any()


@pytest.mark.parametrize(("forward", "device"), masked_kernels("by_shape", "rows_packed", "blocks"))
def test_prefill_into_a_larger_cache(forward, device):
    B, Tq, Tk = MASKED_SHAPES["prefill"]
    with forward_kernel(None if forward == "by_shape" else forward):
        check_masked_forward(device, B, 9, 3, Tq, Tk, 64, cache_mask("hidden_rows", B, 9, Tq, Tk))


def test_masked_shapes_reach_each_layout():
    assert forward_layout(1, 9, 3, *MASKED_SHAPES["decode"][1:], 64, 64).splits == 5
    assert forward_layout(2, 9, 3, *MASKED_SHAPES["chunk5"][1:], 64, 64).splits == 4
    assert forward_layout(1, 9, 3, *MASKED_SHAPES["prefill"][1:], 64, 64) == RowsLayout(3, 3, 64)
    assert team_layout(1, 9, 3, *MASKED_SHAPES["decode"][1:], 64, 64) is None
    assert team_layout(2, 9, 3, *MASKED_SHAPES["chunk5"][1:], 64, 64) is not None
    assert team_layout(1, 9, 3, *MASKED_SHAPES["prefill"][1:], 64, 64) is not None
    with forward_kernel("rows"):
        assert forward_layout(2, 9, 3, 5, 200, 64, 64) == RowsLayout(3, 1, 64)
    with forward_kernel("rows_packed"):
        assert forward_layout(2, 9, 3, 5, 200, 64, 64) == RowsLayout(3, 5, 64)
    with forward_kernel("blocks"):
        assert forward_layout(2, 9, 3, 5, 200, 64, 64) is None


@pytest.mark.lavapipe
@pytest.mark.parametrize("forward", ["by_shape", "rows", "rows_packed", "rows_split", "blocks"])
def test_key_blocks_the_mask_hides_are_not_read(forward):
    # Keys 0..63 (left padding) and 192.. (unwritten cache slots) are hidden from every row:
    # whole 64-key blocks, the walk's unit, so that no block walked reads their NaN K and V
    # (the team kernel, chosen by shape here, narrows its walk to the visible keys exactly).
    # Where the keys are split over workgroups (one block each), the first and the last two
    # walk nothing and leave empty partial softmaxes to the combination.
    B, Hq, Tq, Tk = 1, 9, 3, 320
    mask = cache_mask("cache", B, Hq, Tq, Tk)
    mask[..., :64] = -np.inf
    assert np.isneginf(mask[..., 192:]).all()
    with forward_kernel(None if forward == "by_shape" else forward):
        if forward == "by_shape":
            assert team_layout(B, Hq, 3, Tq, Tk, 64, 64) is not None
        if forward == "rows_split":
            assert forward_layout(B, Hq, 3, Tq, Tk, 64, 64).splits == 5
        nan_keys = [*range(64), *range(192, Tk)]
        check_masked_forward("vulkan-cpu", B, Hq, 3, Tq, Tk, 64, mask, nan_keys=nan_keys)


def test_boolean_mask_means_may_attend():
    rng = np.random.default_rng(2)
    q, k, v = (rng.standard_normal((1, 2, 4, 8)).astype(np.float32) for _ in range(3))
    keep = rng.random((4, 4)) > 0.3
    keep[:, 0] = True
    g = Graph()
    ins = [g.input(n, a.shape) for n, a in (("q", q), ("k", k), ("v", v))]
    m = g.input("m", keep.shape, "bool")
    g.output("out", F.scaled_dot_product_attention(*ins, attn_mask=m))
    got = build(g, device="cpu").run({"q": q, "k": k, "v": v, "m": keep})["out"]
    want = torch.nn.functional.scaled_dot_product_attention(
        *(torch.tensor(a) for a in (q, k, v)), attn_mask=torch.tensor(keep)
    )
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-6)


def test_three_dim_inputs_are_one_batch():
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((2, 5, 4)).astype(np.float32) for _ in range(3))
    g = Graph()
    ins = [g.input(n, a.shape) for n, a in (("q", q), ("k", k), ("v", v))]
    out = g.output("out", F.scaled_dot_product_attention(*ins, is_causal=True))
    assert out.shape == (2, 5, 4)
    got = build(g, device="cpu").run({"q": q, "k": k, "v": v})["out"]
    want = torch.nn.functional.scaled_dot_product_attention(
        *(torch.tensor(a) for a in (q, k, v)), is_causal=True
    )
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("q", "k", "v", "mask", "message"),
    [
        ((1, 3, 4, 8), (1, 2, 4, 8), (1, 2, 4, 8), None, "multiple of key/value heads"),
        ((1, 2, 4, 8), (1, 2, 4, 6), (1, 2, 4, 8), None, "head dims differ"),
        ((1, 2, 4, 8), (1, 2, 5, 8), (1, 2, 4, 8), None, "one number of heads and of tokens"),
        ((1, 2, 4, 8), (1, 2, 5, 8), (1, 2, 5, 8), (4, 4), "does not broadcast"),
        ((1, 2, 4, 8), (1, 2, 5, 8), (1, 2, 5, 8), (3, 1, 4, 5), "does not broadcast"),
    ],
)
def test_shape_errors_at_build_time(q, k, v, mask, message):
    g = Graph()
    ins = [g.input(n, s) for n, s in (("q", q), ("k", k), ("v", v))]
    m = g.input("m", mask) if mask else None
    with pytest.raises(ValueError, match=message):
        F.scaled_dot_product_attention(*ins, attn_mask=m)


def test_training_memory_is_linear_in_sequence_length():
    # No buffer of the forward or backward holds a [Tq, Tk] matrix per head.
    B, H, T, D = 1, 2, 1024, 16
    g = Graph()
    q, k, v = (g.parameter(n, (B, H, T, D)) for n in "qkv")
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    loss = (out * out).sum()
    roots = [loss.id] + [t.id for t in grad(loss, [q, k, v])]
    program = make_plan(g, roots, {})
    largest = max(b.nbytes for b in program.buffers)
    assert largest <= 2 * B * H * T * (D + 1) * 4  # dk and dv packed
    assert 16 * largest <= B * H * T * T * 4  # what one [T, T] matrix per head would take
    kinds = {g.nodes[kern.node].op for kern in program.kernels}
    assert {"attention", "attention_grad_q", "attention_grad_kv"} <= kinds


# -- the team kernel (short prefill chunks) -----------------------------------------------------


def prefill_mask(B: int, Tq: int, Tk: int, filled: int, padding: int = 0) -> np.ndarray:
    """[B, 1, Tq, Tk] additive mask of Tq new tokens written after `filled` cache slots, as
    generation builds it: each sees the slots up to its own, later slots are hidden; batch
    row b also hides its first `padding` * b slots (left padding)."""
    keys = np.arange(Tk)[None, None, None, :]
    visible = keys <= filled + np.arange(Tq)[None, None, :, None]
    visible = visible & (keys >= padding * np.arange(B)[:, None, None, None])
    return np.where(visible, 0.0, -np.inf).astype(np.float32)


TEAM_CASES = {
    # SmolLM2-135M's 128-token prefill into its 512-slot KV cache (GQA 9 / 3, head dim 64).
    "smollm2_prefill": dict(B=1, Hq=9, Hkv=3, Tq=128, Tk=512, D=64, filled=0),
    # A chunk of 37 tokens after a 100-token prompt: the visible keys start mid-split.
    "smollm2_chunk": dict(B=1, Hq=9, Hkv=3, Tq=37, Tk=512, D=64, filled=100),
    "batch2_left_padding": dict(B=2, Hq=6, Hkv=2, Tq=13, Tk=96, D=32, filled=20, padding=7),
    "causal_no_mask": dict(B=1, Hq=4, Hkv=2, Tq=45, Tk=45, D=64, Dv=64, causal=True),
    "head_dim_40": dict(B=1, Hq=3, Hkv=1, Tq=11, Tk=70, D=40, Dv=40, causal=True),
    "batch2_dv24": dict(B=2, Hq=4, Hkv=4, Tq=6, Tk=30, D=16, Dv=24, causal=True),
    # Teams of 16 lanes: more than lavapipe's subgroups hold, so they add through workgroup
    # memory with subgroup operations allowed too.
    "head_dim_128_window_softcap": dict(
        B=1, Hq=2, Hkv=1, Tq=20, Tk=90, D=128, Dv=128, causal=True, window=30, softcap=3.0
    ),
}


def subgroup_sums(monkeypatch, device: str, sums: bool) -> None:
    """Let (or keep) kernels built on `device` from here on add across lanes through
    subgroup operations; skips where the device's start-up check turned them off."""
    gpu = build(Graph(), device=device).executor.gpu
    if sums and not gpu.checks["subgroup_sums"]:
        pytest.skip(f"subgroup sums are off on {gpu.info.name}")
    monkeypatch.setitem(gpu.checks, "subgroup_sums", sums)


SUMS = pytest.mark.parametrize("sums", [False, True], ids=["shared", "subgroups"])


@SUMS
@pytest.mark.parametrize("device", [LAVAPIPE, GPU])
@pytest.mark.parametrize("case", sorted(TEAM_CASES))
def test_team_forward_matches_torch(monkeypatch, case, device, sums):
    """The team kernel, chosen by shape, against PyTorch (outputs and log-sum-exps), with its
    lanes adding through subgroup operations and through workgroup memory."""
    subgroup_sums(monkeypatch, device, sums)
    c = dict(TEAM_CASES[case])
    B, Hq, Hkv, Tq, Tk, D = (c.pop(n) for n in ("B", "Hq", "Hkv", "Tq", "Tk", "D"))
    assert team_layout(B, Hq, Hkv, Tq, Tk, D, c.get("Dv", D)) is not None
    if "filled" in c:
        mask = prefill_mask(B, Tq, Tk, c.pop("filled"), c.pop("padding", 0))
        check_masked_forward(device, B, Hq, Hkv, Tq, Tk, D, mask)
    else:
        flags = dict(causal=False, window=0, softcap=0.0, scale=None) | c
        check_forward(device, B, Hq, Hkv, Tq, Tk, D, **flags)


@SUMS
@pytest.mark.parametrize("device", [LAVAPIPE, GPU])
def test_team_forward_reads_f16(monkeypatch, device, sums):
    subgroup_sums(monkeypatch, device, sums)
    B, Hq, Hkv, Tq, Tk, D = 1, 6, 2, 24, 200, 64
    rng = np.random.default_rng(5)
    q, k, v = (
        rng.standard_normal(shape).astype(np.float16)
        for shape in ((B, Hq, Tq, D), (B, Hkv, Tk, D), (B, Hkv, Tk, D))
    )
    mask = prefill_mask(B, Tq, Tk, 50)
    assert team_layout(B, Hq, Hkv, Tq, Tk, D, D) is not None
    g = Graph()
    tq, tk, tv = (g.input(n, a.shape, "f16") for n, a in (("q", q), ("k", k), ("v", v)))
    g.output("out", F.scaled_dot_product_attention(tq, tk, tv, g.input("m", mask.shape)))
    got = build(g, device=device).run({"q": q, "k": k, "v": v, "m": mask})["out"]
    tq, tk, tv, tm = (torch.tensor(a, dtype=torch.float64) for a in (q, k, v, mask))
    ref = torch_attention(tq, tk, tv, tm, False, 0, 0.0, D**-0.5).numpy()
    assert got.dtype == np.float16
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 3e-3


@pytest.mark.parametrize("sums", [False, True])
def test_team_kernel_uses_subgroups_only_where_allowed(sums):
    g = Graph()
    q, k, v = (
        g.input(n, (1, h, t, 64)) for n, h, t in (("q", 9, 128), ("k", 3, 512), ("v", 3, 512))
    )
    out = F.scaled_dot_product_attention(q, k, v, g.input("m", (1, 1, 128, 512)))
    program = make_plan(g, [out.id], {})
    program.options["subgroup_sums"] = sums
    (kernel,) = [kern for kern in program.kernels if g.nodes[kern.node].op == "attention"]
    source = generate(program, kernel)
    assert source.label.startswith("attention") and source.grid == (128, 3, 1)
    assert ("subgroupShuffleXor" in source.wgsl) is sums
    # Without a whole team in one subgroup, the lanes add through workgroup memory.
    assert "team_mem[pb" in source.wgsl


# -- VJPs against finite differences (float64 through the NumPy references) ----------------------


def _attention_case(**options):
    def fn(q, k, v, mask=None):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **options)

    return fn


FD_CASES = {
    "attention_gqa_causal_kv_cache": (
        _attention_case(is_causal=True),
        {"q": (1, 4, 2, 3), "k": (1, 2, 4, 3), "v": (1, 2, 4, 2)},
    ),
    "attention_mask_softcap_window": (
        _attention_case(is_causal=True, softcap=1.5, window=2, scale=0.7),
        {"q": (1, 2, 3, 3), "k": (1, 1, 3, 3), "v": (1, 1, 3, 3), "mask": (2, 1, 3)},
    ),
    "segment": (lambda x: segment(x, 2, (2, 3)) * 3.0, {"x": (3, 4)}),
    "unsegment": (
        lambda x: x.graph.apply("unsegment", [x], start=1, shape=(2, 5)),
        {"x": (2, 3)},
    ),
}


def _fd_arrays(name):
    rng = np.random.default_rng(len(name))
    return {key: normal(rng, shape) for key, shape in FD_CASES[name][1].items()}


@pytest.mark.parametrize("name", FD_CASES)
def test_vjp_matches_finite_differences(name):
    check_finite_differences(FD_CASES[name][0], _fd_arrays(name))


def test_finite_difference_cases_cover_every_vjp():
    covered = set()
    for name, (fn, _) in FD_CASES.items():
        opg = op_graph(fn, _fd_arrays(name))
        covered |= {node.op for node in opg.graph.nodes[: opg.out.id + 1]}
    modules = ("meganeura.ops.attention", "meganeura.ops.packed")
    with_vjp = {n for n, op in all_ops().items() if op.vjp and op.vjp.__module__ in modules}
    assert with_vjp - covered == set()


@pytest.mark.parametrize(("device", "forward"), DEVICE_KERNELS)
@pytest.mark.parametrize("tq", [1, 6])
@pytest.mark.parametrize("asked", [False, True], ids=["chosen", "asked"])
def test_tokens_first_output_matches_torch(device, forward, tq, asked):
    # The output stored [B, Tq, Hq, Dv] (asked for, or chosen by the lowering because the
    # heads are merged back into rows, as a model does before its output projection): the
    # rows read it in place; values and gradients are those of the heads-first layout.
    B, Hq, Hkv, Tk, D = 2, 4, 2, 70, 8  # two key blocks: rows_split combines two splits
    rng = np.random.default_rng(tq)
    arrays = {
        "q": rng.standard_normal((B, Hq, tq, D)).astype(np.float32),
        "k": rng.standard_normal((B, Hkv, Tk, D)).astype(np.float32),
        "v": rng.standard_normal((B, Hkv, Tk, D)).astype(np.float32),
        "w": rng.standard_normal((5, Hq * D)).astype(np.float32),
    }
    g = Graph()
    q, k, v, w = (g.parameter(n, a.shape, init=a) for n, a in arrays.items())
    out = attention(q, k, v, causal=True, tokens_first=asked)
    rows = out.permute(0, 2, 1, 3).reshape(B, tq, Hq * D)
    y = g.output("y", rows @ w.T)
    for name, d in zip(("dq", "dk", "dv"), grad((y * y).sum(), [q, k, v]), strict=True):
        g.output(name, d)
    with forward_kernel(forward):
        session = build(g, device=device)
        got = session.run({})
    stored = [n.attrs["tokens_first"] for n in session.graph.nodes if n.op == "attention"]
    assert stored == [True]
    if device != "cpu":  # the projection reads the attention's buffer: no copy in between
        kernels = [session.graph.nodes[kern.node].op for kern in session._last.plan.kernels]
        assert "reshape" not in kernels, kernels
    t = {n: torch.tensor(a, dtype=torch.float64, requires_grad=True) for n, a in arrays.items()}
    kk, vv = (x.repeat_interleave(Hq // Hkv, 1) for x in (t["k"], t["v"]))
    visible = torch.ones(tq, Tk, dtype=torch.bool).tril(Tk - tq)
    ref = torch.nn.functional.scaled_dot_product_attention(t["q"], kk, vv, attn_mask=visible)
    ref_y = ref.permute(0, 2, 1, 3).reshape(B, tq, Hq * D) @ t["w"].T
    (ref_y * ref_y).sum().backward()
    np.testing.assert_allclose(got["y"], ref_y.detach().numpy(), rtol=2e-4, atol=2e-5)
    for name in ("q", "k", "v"):
        np.testing.assert_allclose(
            got[f"d{name}"], t[name].grad.numpy(), rtol=2e-4, atol=2e-4, err_msg=name
        )


def test_outputs_not_merged_into_rows_stay_heads_first():
    from meganeura.lower.rewrite import lowered

    g = Graph()
    q, k, v = (g.input(n, (1, 2, 3, 4)) for n in "qkv")
    out = attention(q, k, v)
    g.output("heads", out * 2.0)
    g.output("rows", out.permute(0, 1, 3, 2))  # another transpose: not the heads merged
    lowered_graph, ids = lowered(g)
    assert ids is None and lowered_graph is g


# -- matrix units --------------------------------------------------------------------------------

UNIT_CASES = {
    "gqa_causal": dict(B=1, Hq=4, Hkv=2, Tq=150, Tk=150, D=64, Dv=64, causal=True),
    "cross_mask": dict(B=2, Hq=2, Hkv=1, Tq=70, Tk=200, D=40, Dv=24, mask_shape=(2, 1, 70, 200)),
    "window_softcap": dict(
        B=1, Hq=2, Hkv=2, Tq=130, Tk=130, D=32, Dv=32, causal=True, window=50, softcap=3.0
    ),
}


@pytest.mark.gpu
@pytest.mark.parametrize("case", sorted(UNIT_CASES))
def test_attention_forward_on_matrix_units(case):
    """Under matmul_precision="high" (where f32 products on matrix units pay) the 64-query
    forward runs on matrix units: q, k, v and the probabilities rounded to f16, the rest f32.
    The backward kernels (f32) read its outputs and log-sum-exps as they read the f32
    kernel's."""
    c = UNIT_CASES[case]
    B, Hq, Hkv, Tq, Tk, D, Dv = (c[n] for n in ("B", "Hq", "Hkv", "Tq", "Tk", "D", "Dv"))
    rng = np.random.default_rng(3)
    q = rng.standard_normal((B, Hq, Tq, D)).astype(np.float32)
    k = rng.standard_normal((B, Hkv, Tk, D)).astype(np.float32)
    v = rng.standard_normal((B, Hkv, Tk, Dv)).astype(np.float32)
    mask = rng.standard_normal(c["mask_shape"]).astype(np.float32) if "mask_shape" in c else None
    upstream = rng.standard_normal((B, Hq, Tq, Dv)).astype(np.float32)
    flags = dict(is_causal=c.get("causal", False), window=c.get("window", 0))
    flags["softcap"] = c.get("softcap", 0.0)
    g = Graph()
    tq, tk, tv = (g.parameter(n, a.shape, init=a) for n, a in (("q", q), ("k", k), ("v", v)))
    tm = g.input("mask", mask.shape) if mask is not None else None
    out = g.output("out", F.scaled_dot_product_attention(tq, tk, tv, tm, **flags))
    grads = grad((out * g.input("up", upstream.shape)).sum(), [tq, tk, tv])
    for name, t in zip(("dq", "dk", "dv"), grads, strict=True):
        g.output(name, t)
    with forward_kernel("blocks"):
        session = build(g, device="gpu", matmul_precision="high")
        feeds = {"up": upstream} | ({"mask": mask} if mask is not None else {})
        got = session.run(feeds)
        program, _ = session._program((g.outputs["out"],), "forward")
        wgsl = "".join(generate(program.plan, kk).wgsl for kk in program.plan.kernels)
    assert ("subgroupMatrix" in wgsl) == session.executor.f32_on_units
    rounded = [
        torch.tensor(a.astype(np.float16).astype(np.float64), requires_grad=True) for a in (q, k, v)
    ]
    ref_mask = torch.tensor(mask, dtype=torch.float64) if mask is not None else None
    logits = torch_logits(
        rounded[0],
        rounded[1],
        ref_mask,
        flags["is_causal"],
        flags["window"],
        flags["softcap"],
        1 / math.sqrt(D),
    )
    ref = torch.softmax(logits, -1) @ rounded[2].repeat_interleave(Hq // Hkv, 1)
    ref.backward(torch.tensor(upstream, dtype=torch.float64))
    want = {"out": ref, "dq": rounded[0].grad, "dk": rounded[1].grad, "dv": rounded[2].grad}
    for name, expected in want.items():
        expected = expected.detach().numpy()
        error = np.linalg.norm(got[name] - expected) / np.linalg.norm(expected)
        assert error < (3e-3 if name == "out" else 1e-2), (name, error)


@pytest.mark.gpu
def test_f16_attention_runs_on_matrix_units():
    rng = np.random.default_rng(4)
    B, Hq, Hkv, T, D = 1, 8, 4, 200, 64
    q, k, v = (
        rng.standard_normal(shape).astype(np.float16)
        for shape in ((B, Hq, T, D), (B, Hkv, T, D), (B, Hkv, T, D))
    )
    g = Graph()
    tq, tk, tv = (g.input(n, a.shape, "f16") for n, a in (("q", q), ("k", k), ("v", v)))
    g.output("out", F.scaled_dot_product_attention(tq, tk, tv, None, is_causal=True))
    with forward_kernel("blocks"):
        session = build(g, device="gpu")
        got = session.run({"q": q, "k": k, "v": v})["out"]
        program, _ = session._program((g.outputs["out"],), "forward")
        wgsl = "".join(generate(program.plan, kk).wgsl for kk in program.plan.kernels)
    assert ("subgroupMatrix" in wgsl) == bool(session.executor.matrix_unit)
    tq, tk, tv = (torch.tensor(a, dtype=torch.float64) for a in (q, k, v))
    logits = torch_logits(tq, tk, None, True, 0, 0.0, D**-0.5)
    ref = (torch.softmax(logits, -1) @ tv.repeat_interleave(Hq // Hkv, 1)).numpy()
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 3e-3
