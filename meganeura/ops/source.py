"""Sources: graph inputs, parameters and constants. They own buffers and launch no kernel."""

from __future__ import annotations

from meganeura.ops import OpDef, register


def _source_type(types, attrs):
    raise AssertionError("source nodes are typed when they are created")


for _name in ("input", "parameter"):
    register(OpDef(_name, "source", _source_type, doc=f"a graph {_name}, fed by name"))

register(
    OpDef(
        "constant",
        "source",
        _source_type,
        reference=lambda arrays, attrs: attrs["value"],
        doc="a constant array baked into the graph",
    )
)
