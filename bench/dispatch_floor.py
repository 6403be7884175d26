"""What a dispatch costs the device, whatever its kernel: N tiny dispatches recorded in one
compute pass, timestamps at the pass's beginning and end, in microseconds per dispatch.

Three patterns: each dispatch reading the previous one's output (a chain, as a model's
kernels are), each writing an output of its own, and all writing the same output; each at
1, 64 and 480 workgroups of 64 invocations. On an H200 through Vulkan (Dawn) all cost about
2-2.5 us: the floor of a dependent launch inside one pass.

    python bench/dispatch_floor.py [--device gpu] [--dispatches 400]
"""

from __future__ import annotations

import argparse
import statistics

from meganeura import Graph, build
from meganeura.backends.webgpu.runtime import pass_microseconds

KERNEL = """
@group(0) @binding(0) var<storage, read> a: array<f32>;
@group(0) @binding(1) var<storage, read_write> b: array<f32>;
@compute @workgroup_size(64) fn main(@builtin(global_invocation_id) g: vec3<u32>) {
  if (g.x < arrayLength(&b)) { b[g.x] = a[g.x % arrayLength(&a)] + 1.0; }
}"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="gpu")
    parser.add_argument("--dispatches", type=int, default=400)
    args = parser.parse_args()
    graph = Graph()
    graph.output("y", graph.input("x", (4,)) * 2.0)
    executor = build(graph, device=args.device).executor  # a device opened as sessions do
    device, wgpu = executor.device, executor.wgpu
    if "timestamp-query" not in executor.gpu.features:
        raise SystemExit(f"{executor.description} does not offer timestamp-query")
    module = device.create_shader_module(code=KERNEL)
    pipeline = device.create_compute_pipeline(
        layout="auto", compute={"module": module, "entry_point": "main"}
    )
    usage = wgpu.BufferUsage

    def buffer(n: int):
        return device.create_buffer(size=4 * n, usage=usage.STORAGE | usage.COPY_DST)

    def bind(a, b):
        entries = [
            {"binding": i, "resource": {"buffer": x, "offset": 0, "size": x.size}}
            for i, x in enumerate((a, b))
        ]
        return device.create_bind_group(layout=pipeline.get_bind_group_layout(0), entries=entries)

    def per_dispatch(groups: list, workgroups: int) -> float:
        def record(cpass):
            cpass.set_pipeline(pipeline)
            for group in groups:
                cpass.set_bind_group(0, group)
                cpass.dispatch_workgroups(workgroups)

        times = [pass_microseconds(device, wgpu, record) / len(groups) for _ in range(7)]
        return statistics.median(times[2:])

    n = args.dispatches
    print(f"{executor.description}: device time per dispatch, {n} in one compute pass")
    for workgroups in (1, 64, 480):
        size = 64 * workgroups
        x0, x1, c = buffer(size), buffer(size), buffer(size)
        chain = [bind(x0, x1), bind(x1, x0)] * (n // 2)
        own = [bind(c, buffer(size)) for _ in range(n)]
        same = [bind(c, x0)] * n
        print(
            f"  {workgroups:3d} workgroups: chain {per_dispatch(chain, workgroups):.2f} us, "
            f"outputs of their own {per_dispatch(own, workgroups):.2f} us, "
            f"one output {per_dispatch(same, workgroups):.2f} us"
        )


if __name__ == "__main__":
    main()
