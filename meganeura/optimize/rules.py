"""Rewrite rules, as data: each is an egglog rule with a name, a stage and the ops it needs.

Stages run in order, each to saturation together with the stages before it:
- `canon`: canonicalization and algebra (double negation, inverse permutations, reshape and
  broadcast chains, identities with 0 and 1, scalar folding, scalars moved to the right and
  out of products, powers and square roots in one spelling, transposes read by matmul);
- `recognize`: decomposed patterns become the op that computes them in one kernel (silu,
  gelu in erf and tanh forms, softmax, log_softmax, rms_norm, layer_norm, attention, ...);
- `fuse`: fusions across ops (swiglu, matmul epilogues);
- `prologue`: a norm moves into the matmul that reads it (rms_norm_matmul, layer_norm_matmul),
  through the reshapes and row slices between them. The pass before autodiff skips this
  stage: the backward pass, not built yet, reads the normalized rows.

A rule is only loaded when every op it builds is registered, so rules for fused ops switch on
as those ops land. Rules that need facts egglog cannot compute (the inverse of a permutation,
whether a constant is a causal mask) read them from small tables that facts.py computes in
Python from the types and attributes present in the region.

Soundness: each node carries its type, so a pattern that names a type variable twice matches
only equal types; rules whose rewrite would change broadcasting check `type-of` explicitly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from itertools import product

from meganeura.ops import all_ops
from meganeura.optimize.egraph import quote

STAGES = ("canon", "recognize", "fuse", "prologue")
NONE = "(ANone)"


@dataclass(frozen=True)
class Rule:
    name: str
    stage: str
    query: tuple[str, ...]
    actions: tuple[str, ...]
    builds: tuple[str, ...] = ()  # ops the rule creates: it is loaded only if all exist

    def text(self) -> str:
        return (
            f"(rule ({' '.join(self.query)}) ({' '.join(self.actions)}) "
            f":ruleset {self.stage} :name {quote(self.name)})"
        )


def P(op: str, t: str, *kids: str, a: str = NONE) -> str:
    """A pattern (or action term) for an op node with type variable (or expression) `t`."""
    if len(kids) > 4:
        raise ValueError(f"rule patterns take at most 4 inputs, {op} has {len(kids)}")
    return f"(E{len(kids)} {quote(op)} {a} {t}{' ' if kids else ''}{' '.join(kids)})"


def S(value: str, t: str) -> str:
    return f"(Scalar {value} {t})"


def near(var: str, value: float, tol: float = 1e-6) -> str:
    return f"(< (abs (- {var} {value!r})) {tol!r})"


RULES: list[Rule] = []


_OP_NAME = re.compile(r'\(E[0-4V] "([^"]+)"')


def rule(name: str, stage: str, query, actions) -> None:
    """A rule; the ops its actions name but its query does not are the ops it builds."""
    q = (query,) if isinstance(query, str) else tuple(query)
    a = (actions,) if isinstance(actions, str) else tuple(actions)
    builds = set(_OP_NAME.findall(" ".join(a))) - set(_OP_NAME.findall(" ".join(q)))
    if any(r.name == name for r in RULES):
        raise ValueError(f"rule {name!r} is defined twice")
    RULES.append(Rule(name, stage, q, a, tuple(sorted(builds))))


def rewrite(name: str, stage: str, lhs: str, rhs: str, when=()) -> None:
    """lhs -> rhs: union the matched root with the new term."""
    rule(name, stage, [f"(= ?root {lhs})", *when], [f"(union ?root {rhs})"])


# -- canonicalization and algebra -----------------------------------------------------------

rewrite("double-negation", "canon", P("neg", "?t", P("neg", "?t", "?x")), "?x")
rewrite(
    "permute-inverse",
    "canon",
    P("permute", "?t", P("permute", "?t2", "?x", a="(AStr ?p)"), a="(AStr ?q)"),
    "?x",
    ["(= ?q (perm-inverse ?p))"],
)
rewrite(
    "permute-identity",
    "canon",
    P("permute", "?t", "?x", a="(AStr ?p)"),
    "?x",
    ["(identity-perm ?p)"],
)
for _view in ("reshape", "broadcast_to"):
    rewrite(
        f"{_view}-chain",
        "canon",
        P(_view, "?t", P(_view, "?t2", "?x", a="?b"), a="?a"),
        P(_view, "?t", "?x", a="?a"),
    )
for _view in ("reshape", "broadcast_to", "cast"):
    rewrite(
        f"{_view}-identity", "canon", P(_view, "?t", "?x", a="?a"), "?x", ["(= ?t (type-of ?x))"]
    )
rewrite(
    "reshape-of-broadcast-scalar",
    "canon",
    P("reshape", "?t", P("broadcast_to", "?t2", S("?c", "?ts"), a="?b"), a="?a"),
    P("broadcast_to", "?t", S("?c", "?st"), a="?a"),
    ["(= ?st (scalar-type ?t))"],
)

# Scalars go right in commutative ops, so later patterns need one spelling.
for _op in ("add", "mul", "maximum", "minimum"):
    rewrite(
        f"{_op}-scalar-right",
        "canon",
        P(_op, "?t", S("?c", "?ts"), "?x"),
        P(_op, "?t", "?x", S("?c", "?ts")),
    )
# A broadcast scalar operand is a scalar operand: the op broadcasts it anyway.
for _op, _side in product(("add", "sub", "mul", "div", "pow", "maximum", "minimum"), (0, 1)):
    _b = P("broadcast_to", "?tb", S("?c", "?ts"), a="?a")
    _kids = ("?x", _b) if _side else (_b, "?x")
    _new = ("?x", S("?c", "?ts")) if _side else (S("?c", "?ts"), "?x")
    rewrite(
        f"{_op}-broadcast-scalar-{'right' if _side else 'left'}",
        "canon",
        P(_op, "?t", *_kids),
        P(_op, "?t", *_new),
        ["(= ?t (type-of ?x))"],
    )
# Identities: the result must keep x's type (a scalar may not broadcast x up).
for _op, _value in (("add", "0.0"), ("sub", "0.0"), ("mul", "1.0"), ("div", "1.0"), ("pow", "1.0")):
    rewrite(
        f"{_op}-identity",
        "canon",
        P(_op, "?t", "?x", S(_value, "?ts")),
        "?x",
        ["(= ?t (type-of ?x))"],
    )
rewrite(
    "zero-minus",
    "canon",
    P("sub", "?t", S("0.0", "?ts"), "?x"),
    P("neg", "?t", "?x"),
    ["(= ?t (type-of ?x))"],
)
rewrite(
    "times-minus-one",
    "canon",
    P("mul", "?t", "?x", S("-1.0", "?ts")),
    P("neg", "?t", "?x"),
    ["(= ?t (type-of ?x))"],
)
rewrite(
    "add-negation", "canon", P("add", "?t", "?x", P("neg", "?t2", "?y")), P("sub", "?t", "?x", "?y")
)
rewrite(
    "sub-negation", "canon", P("sub", "?t", "?x", P("neg", "?t2", "?y")), P("add", "?t", "?x", "?y")
)
rewrite("negate-scalar", "canon", P("neg", "?t", S("?c", "?ts")), S("(* -1.0 ?c)", "?t"))
# (egglog's f64 division by zero is an error, so divisions by 0 are left as they are.)
for _op, _fn in (("add", "+"), ("sub", "-"), ("mul", "*"), ("div", "/")):
    rewrite(
        f"fold-{_op}",
        "canon",
        P(_op, "?t", S("?a", "?ta"), S("?b", "?tb")),
        S(f"({_fn} ?a ?b)", "?t"),
        ["(!= ?b 0.0)"] if _op == "div" else [],
    )
rewrite(
    "divide-by-scalar",
    "canon",
    P("div", "?t", "?x", S("?c", "?ts")),
    P("mul", "?t", "?x", S("(/ 1.0 ?c)", "?ts")),
    ["(!= ?c 0.0)"],
)
rewrite(
    "scalar-product",
    "canon",
    P("mul", "?t", P("mul", "?t", "?x", S("?a", "?ta")), S("?b", "?tb")),
    P("mul", "?t", "?x", S("(* ?a ?b)", "?tb")),
    ["(= ?t (type-of ?x))"],
)
for _power, _rhs in (
    ("2.0", P("mul", "?t", "?x", "?x")),
    ("3.0", P("mul", "?t", P("mul", "?t", "?x", "?x"), "?x")),
    ("0.5", P("sqrt", "?t", "?x")),
    ("-0.5", P("rsqrt", "?t", "?x")),
):
    rewrite(
        f"power-{_power}",
        "canon",
        P("pow", "?t", "?x", S(_power, "?ts")),
        _rhs,
        ["(= ?t (type-of ?x))"],
    )
rewrite(
    "cube-order",
    "canon",
    P("mul", "?t", "?x", P("mul", "?t", "?x", "?x")),
    P("mul", "?t", P("mul", "?t", "?x", "?x"), "?x"),
)
rewrite(
    "reciprocal-sqrt",
    "canon",
    P("div", "?t", S("1.0", "?ts"), P("sqrt", "?t", "?y")),
    P("rsqrt", "?t", "?y"),
)
rewrite(
    "divide-by-sqrt",
    "canon",
    P("div", "?t", "?x", P("sqrt", "?tq", "?y")),
    P("mul", "?t", "?x", P("rsqrt", "?tq", "?y")),
)
# A negation moves into a sum or mean (where it may meet another).
for _red_op in ("sum", "mean"):
    rewrite(
        f"negate-{_red_op}",
        "canon",
        P("neg", "?t", P(_red_op, "?t", "?x", a="?a")),
        P(_red_op, "?t", P("neg", "?tx", "?x"), a="?a"),
        ["(= ?tx (type-of ?x))"],
    )
# matmul reads transposed operands in place, and scalar factors move out of it.
for _side, (_flag_in, _flag_out) in product((0, 1), ((0, 1), (1, 0))):
    _flags = ["?fa", "?fb"]
    _flags[_side] = f"(AInt {_flag_in})"
    _in = f"(ATup {_flags[0]} {_flags[1]})"
    _flags[_side] = f"(AInt {_flag_out})"
    _out = f"(ATup {_flags[0]} {_flags[1]})"
    _perm = P("permute", "?tp", "?m", a="(AStr ?p)")
    _kids = ("?o", _perm) if _side else (_perm, "?o")
    _new = ("?o", "?m") if _side else ("?m", "?o")
    rewrite(
        f"matmul-transposed-{'b' if _side else 'a'}{_flag_in}",
        "canon",
        P("matmul", "?t", *_kids, a=_in),
        P("matmul", "?t", *_new, a=_out),
        ["(swap-last2 ?p)"],
    )
for _side in (0, 1):
    _scaled = P("mul", "?ts", "?m", S("?c", "?tc"))
    _kids = ("?o", _scaled) if _side else (_scaled, "?o")
    _new = ("?o", "?m") if _side else ("?m", "?o")
    rewrite(
        f"matmul-scalar-{'b' if _side else 'a'}",
        "canon",
        P("matmul", "?t", *_kids, a="?f"),
        P("mul", "?t", P("matmul", "?t", *_new, a="?f"), S("?c", "?st")),
        ["(= ?ts (type-of ?m))", "(= ?st (scalar-type ?t))"],
    )


# -- recognition of decomposed patterns -----------------------------------------------------

rewrite(
    "sigmoid",
    "recognize",
    P(
        "div",
        "?t",
        S("1.0", "?ts"),
        P("add", "?t", P("exp", "?t", P("neg", "?t", "?x")), S("1.0", "?t1")),
    ),
    P("sigmoid", "?t", "?x"),
    ["(= ?t (type-of ?x))"],
)
for _n, _kids in enumerate((("?x", P("sigmoid", "?t", "?x")), (P("sigmoid", "?t", "?x"), "?x"))):
    rewrite(f"silu-{_n}", "recognize", P("mul", "?t", *_kids), P("silu", "?t", "?x"))
rewrite(
    "silu-quotient",
    "recognize",
    P("div", "?t", "?x", P("add", "?t", P("exp", "?t", P("neg", "?t", "?x")), S("1.0", "?t1"))),
    P("silu", "?t", "?x"),
)


def _half_x_times(inner: str) -> list[str]:
    """Every product of x, inner and 0.5 (scalars are on the right after canon)."""
    x, h = "?x", S("?h", "?th")
    return [
        P("mul", "?t", P("mul", "?t", x, inner), h),
        P("mul", "?t", P("mul", "?t", inner, x), h),
        P("mul", "?t", P("mul", "?t", x, h), inner),
        P("mul", "?t", inner, P("mul", "?t", x, h)),
        P("mul", "?t", x, P("mul", "?t", inner, h)),
        P("mul", "?t", P("mul", "?t", inner, h), x),
    ]


_erf_inner = P("add", "?t", P("erf", "?t", P("mul", "?t", "?x", S("?r", "?tr"))), S("1.0", "?t1"))
for _n, _lhs in enumerate(_half_x_times(_erf_inner)):
    rewrite(
        f"gelu-erf-{_n}",
        "recognize",
        _lhs,
        P("gelu", "?t", "?x"),
        ["(= ?t (type-of ?x))", near("?h", 0.5), near("?r", 0.7071067811865476)],
    )
_cube = P("mul", "?t", P("mul", "?t", "?x", "?x"), "?x")
_tanh_arg = P(
    "mul", "?t", P("add", "?t", "?x", P("mul", "?t", _cube, S("?k", "?tk"))), S("?c", "?tc")
)
_tanh_inner = P("add", "?t", P("tanh", "?t", _tanh_arg), S("1.0", "?t1"))
for _n, _lhs in enumerate(_half_x_times(_tanh_inner)):
    rewrite(
        f"gelu-tanh-{_n}",
        "recognize",
        _lhs,
        P("gelu_tanh", "?t", "?x"),
        [
            "(= ?t (type-of ?x))",
            near("?h", 0.5),
            near("?k", 0.044715),
            near("?c", 0.7978845608028654),
        ],
    )

_red = "(ATup (AInt ?ax) (AInt 1))"
_max = P("max", "?tm", "?x", a=_red)
for _name, _exp in (
    ("softmax", P("exp", "?t", P("sub", "?t", "?x", _max))),
    ("softmax-unshifted", P("exp", "?t", "?x")),
):
    rewrite(
        _name,
        "recognize",
        P("div", "?t", "?e", P("sum", "?ts", "?e", a=_red)),
        P("softmax", "?t", "?x", a="(AInt ?ax)"),
        [f"(= ?e {_exp})", "(= ?t (type-of ?x))"],
    )
_shifted = P("sub", "?t", "?x", _max)
_lse = P("log", "?ts", P("sum", "?ts", P("exp", "?t", _shifted), a=_red))
rewrite(
    "log-softmax",
    "recognize",
    P("sub", "?t", _shifted, _lse),
    P("log_softmax", "?t", "?x", a="(AInt ?ax)"),
)
rewrite(
    "log-softmax-logsumexp",
    "recognize",
    P("sub", "?t", "?x", P("add", "?ts", _max, _lse)),
    P("log_softmax", "?t", "?x", a="(AInt ?ax)"),
)
rewrite(
    "log-of-softmax",
    "recognize",
    P("log", "?t", P("softmax", "?t", "?x", a="?a")),
    P("log_softmax", "?t", "?x", a="?a"),
)


# A normalization without its weight first, then the weight (and bias) join it.
_mean_last = "(ATup (AInt ?ax) (AInt 1))"
_ms = P("mean", "?tm", P("mul", "?t", "?x", "?x"), a=_mean_last)
_inv_rms = P("rsqrt", "?tm", P("add", "?tm", _ms, S("?eps", "?te")))
for _n, _kids in enumerate((("?x", _inv_rms), (_inv_rms, "?x"))):
    rewrite(
        f"rms-norm-{_n}",
        "recognize",
        P("mul", "?t", *_kids),
        P("rms_norm", "?t", "?x", a="(AFloat ?eps)"),
        ["(= ?t (type-of ?x))", "(= ?ax (last-axis ?t))", "(>= ?eps 0.0)"],
    )
_centered = P("sub", "?t", "?x", P("mean", "?tm", "?x", a=_mean_last))
_var = P("mean", "?tm", P("mul", "?t", "?d", "?d"), a=_mean_last)
_inv_std = P("rsqrt", "?tm", P("add", "?tm", _var, S("?eps", "?te")))
for _n, _kids in enumerate((("?d", _inv_std), (_inv_std, "?d"))):
    rewrite(
        f"layer-norm-{_n}",
        "recognize",
        P("mul", "?t", *_kids),
        P("layer_norm", "?t", "?x", a="(AFloat ?eps)"),
        [f"(= ?d {_centered})", "(= ?t (type-of ?x))", "(= ?ax (last-axis ?t))", "(>= ?eps 0.0)"],
    )
for _op in ("rms_norm", "layer_norm"):
    _norm = P(_op, "?t", "?x", a="?a")
    for _n, _kids in enumerate((("?w", _norm), (_norm, "?w"))):
        rewrite(
            f"{_op.replace('_', '-')}-weight-{_n}",
            "recognize",
            P("mul", "?t", *_kids),
            P(_op, "?t", "?x", "?w", a="?a"),
            ["(= (type-of ?w) (last-vec ?t))"],
        )
_norm_w = P("layer_norm", "?t", "?x", "?w", a="?a")
for _n, _kids in enumerate((("?b", _norm_w), (_norm_w, "?b"))):
    rewrite(
        f"layer-norm-bias-{_n}",
        "recognize",
        P("add", "?t", *_kids),
        P("layer_norm", "?t", "?x", "?w", "?b", a="?a"),
        ["(= (type-of ?b) (last-vec ?t))"],
    )

# Cross-entropy: the log-probability of each row's label, picked by a gather.
rewrite(
    "cross-entropy",
    "recognize",
    P(
        "gather",
        "?tg",
        P("log_softmax", "?tx", "?x", a="(AInt ?ax)"),
        P("reshape", "?tu", "?labels", a="?r"),
        a="(AInt ?ax)",
    ),
    P(
        "neg",
        "?tg",
        P(
            "reshape",
            "?tg",
            P("cross_entropy_rows", "?trows", "?x", "?labels", a="(AInt -100)"),
            a="(AStr ?gshape)",
        ),
    ),
    [
        "(= ?ax (last-axis ?tx))",
        "(= ?trows (rows-type ?tx))",
        "(ce-labels ?tx (type-of ?labels))",
        "(= ?gshape (shape-of ?tg))",
    ],
)


def _attention_rules() -> None:
    """matmul(softmax(q kᵀ · scale + mask), v) in every spelling canon leaves: with or without
    a scale, a causal mask constant, another mask or none, keys and values repeated for
    grouped-query heads or not."""
    k_rep = P(
        "reshape",
        "?tkr",
        P("broadcast_to", "?tke", P("reshape", "?tku", "?k", a="?k1"), a="?k2"),
        a="?k3",
    )
    v_rep = P(
        "reshape",
        "?tvr",
        P("broadcast_to", "?tve", P("reshape", "?tvu", "?v", a="?v1"), a="?v2"),
        a="?v3",
    )
    repeats = [
        "(repeat-kv (type-of ?k) ?tku ?tke ?tkr)",
        "(repeat-kv (type-of ?v) ?tvu ?tve ?tvr)",
    ]
    for repeated in (False, True):
        k, v = (k_rep, v_rep) if repeated else ("?k", "?v")
        scores = P("matmul", "?ts", "?q", k, a="(ATup (AInt 0) (AInt 1))")
        for scaled in (False, True):
            s = P("mul", "?ts", scores, S("?scale", "?tc")) if scaled else scores
            scale = "?scale" if scaled else "1.0"
            for mask in ("causal", "mask", "none"):
                if mask == "causal":
                    logits = P("add", "?ts", s, "(Const ?m ?tm)")
                    when, causal, extra = ["(causal-mask ?m)"], 1, ()
                elif mask == "mask":
                    logits = P("add", "?ts", s, "?mask")
                    when, causal, extra = [], 0, ("?mask",)
                else:
                    logits, when, causal, extra = s, [], 0, ()
                probs = P("softmax", "?ts", logits, a="(AInt 3)")
                attrs = f"(ATup4 (AFloat {scale}) (AInt {causal}) (AInt 0) (AFloat 0.0))"
                packed = P("attention", "?tp", "?q", "?k", "?v", *extra, a=attrs)
                rewrite(
                    f"attention-{'gqa-' if repeated else ''}{'scaled-' if scaled else ''}{mask}",
                    "recognize",
                    P("matmul", "?t", probs, v, a="(ATup (AInt 0) (AInt 0))"),
                    P("segment", "?t", packed, a="(ATup (AInt 0) (AStr ?shape))"),
                    [
                        *when,
                        *(repeats if repeated else ()),
                        "(attn-ok (type-of ?q) (type-of ?k) (type-of ?v))",
                        "(= ?tp (attn-packed (type-of ?q) (type-of ?v)))",
                        "(= ?shape (shape-of ?t))",
                    ],
                )


_attention_rules()


def _rope_rules() -> None:
    """x·cos + rotate_half(x)·sin with constant cos/sin tables of positions 0..T-1 (Hugging
    Face's apply_rotary_pos_emb, rotate_half as a concat of the negated upper half and the
    lower half), in either operand order."""
    rotated = P(
        "concat",
        "?t",
        P("neg", "?th", P("slice", "?th", "?x", a="(AStr ?hi)")),
        P("slice", "?th", "?x", a="(AStr ?lo)"),
        a="(AInt 3)",
    )
    cos, sin = "(Const ?c ?tc)", "(Const ?s ?ts)"
    for n, (a, b, swap) in enumerate(product((0, 1), (0, 1), (0, 1))):
        first = P("mul", "?t", *(("?x", cos) if a else (cos, "?x")))
        second = P("mul", "?t", *((rotated, sin) if b else (sin, rotated)))
        terms = (second, first) if swap else (first, second)
        rewrite(
            f"rope-{n}",
            "recognize",
            P("add", "?t", *terms),
            P("rope", "?t", "?x", "(Const ?pos ?tpos)", "(Const ?freq ?tfreq)", a="?ra"),
            [
                "(= ?t (type-of ?x))",
                "(rope-halves ?t ?lo ?hi)",
                "(rope-tables ?c ?s ?pos ?tpos ?freq ?tfreq)",
                "(= ?ra (rope-attrs))",
            ],
        )


_rope_rules()


# -- fusions ---------------------------------------------------------------------------------

for _n, _kids in enumerate(((P("silu", "?t1", "?g"), "?u"), ("?u", P("silu", "?t1", "?g")))):
    rewrite(f"swiglu-{_n}", "fuse", P("mul", "?t", *_kids), P("swiglu", "?t", "?g", "?u"))


def _prologue_rules() -> None:
    """matmul(norm(x, params), m) -> norm_matmul(x, params, m) for every arity of the norm;
    norms move inside reshapes that keep the last axis and slices that take it whole (rows
    stay whole), so the norm before a model's last-position logits reaches their matmul."""
    for op, arities in (("rms_norm", (0, 1)), ("layer_norm", (0, 1, 2))):
        name = op.replace("_", "-")
        for n in arities:
            params = ("?w", "?b")[:n]
            rewrite(
                f"{name}-matmul-{n}",
                "prologue",
                P(
                    "matmul",
                    "?t",
                    P(op, "?tn", "?x", *params, a="(AFloat ?eps)"),
                    "?m",
                    a="(ATup (AInt 0) (AInt ?tb))",
                ),
                P(f"{op}_matmul", "?t", "?x", *params, "?m", a="(ATup (AFloat ?eps) (AInt ?tb))"),
            )
            rewrite(
                f"reshape-of-{name}-{n}",
                "prologue",
                P("reshape", "?t", P(op, "?tn", "?x", *params, a="?e"), a="?a"),
                P(op, "?t", P("reshape", "?t", "?x", a="?a"), *params, a="?e"),
                ["(= (last-vec ?t) (last-vec ?tn))"],
            )
            rewrite(
                f"slice-of-{name}-{n}",
                "prologue",
                P("slice", "?t", P(op, "?tn", "?x", *params, a="?e"), a="(AStr ?s)"),
                P(op, "?t", P("slice", "?t", "?x", a="(AStr ?s)"), *params, a="?e"),
                ["(whole-rows ?s ?tn)"],
            )


_prologue_rules()

# GGUF-quantized projections take the RMSNorm in as well.
for _n in (0, 1):
    _params = ("?w",)[:_n]
    rewrite(
        f"rms-norm-quantized-matmul-{_n}",
        "prologue",
        P(
            "quantized_matmul",
            "?t",
            P("rms_norm", "?tn", "?x", *_params, a="(AFloat ?eps)"),
            "?raw",
            a="(ATup (AStr ?q) (AStr ?s))",
        ),
        P(
            "rms_norm_quantized_matmul",
            "?t",
            "?x",
            *_params,
            "?raw",
            a="(ATup3 (AFloat ?eps) (AStr ?q) (AStr ?s))",
        ),
    )


def available_rules(ops: set[str] | None = None) -> list[Rule]:
    """The rules whose target ops are registered."""
    ops = set(all_ops()) if ops is None else ops
    return [r for r in RULES if all(op in ops for op in r.builds)]


def built_ops() -> set[str]:
    """Ops that recognition and fusion rules build (views they wrap results in aside): the
    fusions a report counts."""
    ops = all_ops()
    return {
        op
        for r in available_rules()
        if r.stage != "canon"
        for op in r.builds
        if ops[op].kind != "view"
    }


def types_rules() -> str:
    """Every node's type is its e-class's `type-of`."""
    lines = ["(ruleset types)"]
    for leaf in ("Ext", "Scalar", "Const"):
        lines.append(f"(rule ((= ?e ({leaf} ?k ?t))) ((set (type-of ?e) ?t)) :ruleset types)")
    for n in range(5):
        kids = " ".join(f"?c{i}" for i in range(n))
        lines.append(
            f"(rule ((= ?e (E{n} ?o ?a ?t{' ' if kids else ''}{kids}))) ((set (type-of ?e) ?t)) "
            ":ruleset types)"
        )
    lines.append("(rule ((= ?e (EV ?o ?a ?t ?l))) ((set (type-of ?e) ?t)) :ruleset types)")
    return "\n".join(lines)


def schedule(stages=STAGES, rounds: int = 4) -> str:
    """Each stage saturates together with the ones before it (types kept up to date)."""
    parts = []
    for n in range(len(stages)):
        runs = " ".join(f"(run {s})" for s in stages[: n + 1])
        parts.append(f"(repeat {rounds} (seq (saturate (run types)) {runs}))")
    parts.append("(saturate (run types))")
    return f"(seq {' '.join(parts)})"
