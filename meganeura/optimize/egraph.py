"""The egglog e-graph behind the optimizer: its schema, how commands are fed, how it is read.

Everything goes through `egglog.bindings`, one parsed command at a time: measured here,
building through the high-level Python API is superlinear and parsing one large program runs
out of memory. The saturated e-graph is read back with `freeze()` (every constructor's rows,
with canonical e-class values) into plain Python `ENode`s: the same information as
`serialize()`'s JSON, at 50k e-nodes in 2 ms instead of 165 ms to serialize and parse.
egglog's own extractor is never used (its tree cost overflows on deep residual DAGs and then
silently keeps unfused forms); extraction is in extract.py.

Schema. A tensor is a `T`. Leaves are `Ext` (anything the region reads from outside: inputs,
parameters, values computed elsewhere; `k` indexes the region's boundary), `Scalar` (a
size-1 float constant, by value) and `Const` (any other constant, by content). Op nodes are
`E0`..`E4` (and `EV` with a list) holding the op name, its attributes `A`, its result type as
a string (`"f32[2,3]"`) and its inputs. Carrying the type in the node makes rules sound: a
pattern that names one type variable twice only matches tensors of equal type. `Id k` is the
identity of graph node `k`: it is unioned with the node's term and never extracted.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from egglog import bindings

SCHEMA = """
(datatype A
  (ANone)
  (AInt i64)
  (AFloat f64)
  (AStr String)
  (ATup A A)
  (ATup3 A A A)
  (ATup4 A A A A))
(datatype*
  (T
    (Ext i64 String)
    (Scalar f64 String)
    (Const i64 String)
    (Id i64)
    (E0 String A String)
    (E1 String A String T)
    (E2 String A String T T)
    (E3 String A String T T T)
    (E4 String A String T T T T)
    (EV String A String TL))
  (TL
    (TNil)
    (TCons T TL)))
(function type-of (T) String :merge old)
"""

LEAVES = ("Ext", "Scalar", "Const")
OPS = ("E0", "E1", "E2", "E3", "E4", "EV")
ATTRS = ("ANone", "AInt", "AFloat", "AStr", "ATup", "ATup3", "ATup4")


def quote(text: str) -> str:
    """An egglog string literal."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def num(value: float) -> str:
    """An egglog f64 literal (egglog needs the decimal point; inf and nan are spelled out)."""
    if value != value:
        return "NaN"
    if value in (float("inf"), float("-inf")):
        return "inf" if value > 0 else "-inf"
    text = repr(float(value))
    return text if ("." in text or "e" in text) else text + ".0"


def term(op: str, attrs: str, ttype: str, children: list[str]) -> str:
    """The egglog term of an op node."""
    if len(children) <= 4:
        args = " ".join(children)
        return f"(E{len(children)} {quote(op)} {attrs} {quote(ttype)}{' ' if args else ''}{args})"
    tail = "(TNil)"
    for child in reversed(children):
        tail = f"(TCons {child} {tail})"
    return f"(EV {quote(op)} {attrs} {quote(ttype)} {tail})"


@dataclass
class ENode:
    """One e-node as read back: an op (with decoded attributes) or a leaf."""

    op: str  # op name, or "Ext" / "Scalar" / "Const" for leaves
    attrs: object  # decoded A value (op nodes) or the leaf's key (boundary index, value, id)
    type: str
    children: tuple[int, ...] = ()


@dataclass
class Frozen:
    """The saturated e-graph: e-classes (dense ints) holding their e-nodes."""

    classes: list[list[ENode]]
    class_of_node: dict[int, int]  # graph node id (from Id) -> e-class
    type_of: list[str]

    @property
    def num_enodes(self) -> int:
        return sum(len(c) for c in self.classes)


_PREPARED: dict[str, bindings.EGraph] = {}


def prepared(program: str) -> bindings.EGraph:
    """An e-graph with the schema and `program` (rules, tables) loaded, shared by every region:
    loading ~100 rules takes ~70 ms, a push/pop around each region ~1 ms."""
    egraph = _PREPARED.get(program)
    if egraph is None:
        egraph = bindings.EGraph()
        for text in (SCHEMA, program):
            for command in egraph.parse_program(text):
                egraph.run_program(command)
        _PREPARED.clear()
        _PREPARED[program] = egraph
    return egraph


@dataclass
class EGraphRun:
    """One region's use of the prepared e-graph; commands go in one at a time. Use it as a
    context manager: the region's terms are popped when it ends."""

    egraph: bindings.EGraph
    commands: int = 0
    rules_fired: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def __enter__(self) -> EGraphRun:
        self.feed("(push)")
        return self

    def __exit__(self, *exc) -> None:
        self.feed("(pop)")

    def feed(self, program: str) -> list:
        outputs = []
        for command in self.egraph.parse_program(program):
            outputs.extend(self.egraph.run_program(command))
            self.commands += 1
        return outputs

    def feed_lines(self, lines: list[str], stage: str) -> None:
        start = time.perf_counter()
        for line in lines:
            for command in self.egraph.parse_program(line):
                self.egraph.run_program(command)
        self.commands += len(lines)
        self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start

    def run(self, schedule: str, stage: str) -> None:
        """Run a schedule and count, per rule name, how many matches it applied."""
        start = time.perf_counter()
        for output in self.feed(f"(run-schedule {schedule})"):
            report = getattr(output, "report", None)
            if report is None:
                continue
            for rule, count in report.num_matches_per_rule.items():
                if count and not rule.startswith("(rule"):  # unnamed: bookkeeping rules
                    self.rules_fired[rule] = self.rules_fired.get(rule, 0) + count
        self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start

    def freeze(self) -> Frozen:
        start = time.perf_counter()
        eg = self.egraph
        frozen = eg.freeze()
        functions = frozen.functions
        index: dict = {}

        def cls(value) -> int:
            found = index.get(value)
            if found is None:
                found = index[value] = len(index)
            return found

        attrs: dict = {}
        # A values are hash-consed, never unioned: decode each once, children first.
        pending = {name: functions[name].rows for name in ATTRS if name in functions}
        while pending:
            progressed = False
            for name in list(pending):
                rows, left = pending[name], []
                for row in rows:
                    decoded = _decode_attr(eg, name, row.inputs, attrs)
                    if decoded is _MISSING:
                        left.append(row)
                    else:
                        attrs[row.output] = decoded
                        progressed = True
                if left:
                    pending[name] = left
                else:
                    del pending[name]
            if not progressed:
                raise AssertionError(f"optimize: undecodable attributes in {sorted(pending)}")

        lists: dict = {}
        nil = functions.get("TNil")
        if nil is not None:
            for row in nil.rows:
                lists[row.output] = ()
        cons_rows = list(functions["TCons"].rows) if "TCons" in functions else []
        while cons_rows:
            left = [r for r in cons_rows if r.inputs[1] not in lists]
            for row in cons_rows:
                if row.inputs[1] in lists:
                    lists[row.output] = (row.inputs[0], *lists[row.inputs[1]])
            if len(left) == len(cons_rows):
                raise AssertionError("optimize: cyclic tensor list in the e-graph")
            cons_rows = left

        nodes: list[tuple[int, ENode]] = []
        string = eg.value_to_string
        for name in LEAVES:
            if name not in functions:
                continue
            for row in functions[name].rows:
                key_value, type_value = row.inputs
                key = eg.value_to_f64(key_value) if name == "Scalar" else eg.value_to_i64(key_value)
                nodes.append((cls(row.output), ENode(name, key, string(type_value))))
        for name in OPS:
            if name not in functions:
                continue
            for row in functions[name].rows:
                op_value, attr_value, type_value, *kids = row.inputs
                if name == "EV":
                    kids = list(lists[kids[0]])
                children = tuple(cls(k) for k in kids)
                node = ENode(string(op_value), attrs[attr_value], string(type_value), children)
                nodes.append((cls(row.output), node))
        class_of_node = {}
        if "Id" in functions:
            for row in functions["Id"].rows:
                class_of_node[eg.value_to_i64(row.inputs[0])] = cls(row.output)
        classes: list[list[ENode]] = [[] for _ in range(len(index))]
        for c, node in nodes:
            classes[c].append(node)
        type_of = [""] * len(index)
        for c, members in enumerate(classes):
            if members:
                type_of[c] = members[0].type
                for node in members:
                    if node.type != type_of[c]:
                        raise AssertionError(
                            f"optimize: an e-class mixes types {type_of[c]} and {node.type} "
                            f"({node.op}): a rewrite rule is unsound"
                        )
        self.seconds["read"] = self.seconds.get("read", 0.0) + time.perf_counter() - start
        return Frozen(classes, class_of_node, type_of)


_MISSING = object()


def _decode_attr(eg, name: str, inputs, done: dict):
    if name == "ANone":
        return None
    if name == "AInt":
        return eg.value_to_i64(inputs[0])
    if name == "AFloat":
        return eg.value_to_f64(inputs[0])
    if name == "AStr":
        return eg.value_to_string(inputs[0])
    parts = []
    for value in inputs:
        if value not in done:
            return _MISSING
        parts.append(done[value])
    return tuple(parts)
