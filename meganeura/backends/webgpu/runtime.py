"""The WebGPU runtime: programs of generated kernels over planned buffers.

Everything that can be prepared is prepared when a program is compiled: buffers, pipelines
(cached by WGSL text), bind groups and dispatch sizes. Running a program uploads its inputs,
records every dispatch into one compute pass, appends the update copies and submits once,
without waiting. Reading a value waits for the device.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

from meganeura.backends.webgpu.device import GPUDevice
from meganeura.backends.wgsl.kernels import generate
from meganeura.graph import Graph, numpy_dtype
from meganeura.lower.plan import plan as make_plan

# MEGANEURA_DEBUG=1 prints each program's kernels; 2 also prints their WGSL.
DEBUG = int(os.environ.get("MEGANEURA_DEBUG", "0") or 0)


def _storage_bytes(array: np.ndarray) -> bytes:
    if array.dtype == np.bool_:
        array = array.astype(np.uint32)
    return np.ascontiguousarray(array).tobytes()


def _from_bytes(data, ttype) -> np.ndarray:
    dtype = numpy_dtype(ttype.dtype)
    storage = np.uint32 if ttype.dtype == "bool" else dtype
    out = np.frombuffer(data, dtype=storage, count=ttype.size).reshape(ttype.shape)
    return out.astype(dtype) if ttype.dtype == "bool" else out.copy()


class WebGPUExecutor:
    """Keeps persistent buffers (parameters, optimizer state) and compiles programs."""

    def __init__(self, gpu: GPUDevice, matmul_precision: str = "highest"):
        self.gpu = gpu
        self.wgpu = gpu.wgpu
        self.device = gpu.device
        self.description = f"{gpu.info.name} ({gpu.info.backend}, {gpu.info.implementation})"
        self.persistent: dict[int, object] = {}  # node id -> GPUBuffer
        self.types: dict[int, object] = {}
        self._pipelines: dict[str, object] = {}
        usage = self.wgpu.BufferUsage
        self.usage = usage.STORAGE | usage.COPY_SRC | usage.COPY_DST
        self.matmul_precision = matmul_precision
        self.matrix_unit = self._probe_matrix_units()
        self.staged_matrix_units = (
            matmul_precision == "high"
            and self.matrix_unit is not None
            and self._staged_matrix_units_pay()
        )

    @property
    def codegen_options(self) -> dict:
        return {
            "matmul_precision": self.matmul_precision,
            "matrix_unit": self.matrix_unit,
            "staged_matrix_units": self.staged_matrix_units,
        }

    def _probe_matrix_units(self) -> str | None:
        """The subgroup-matrix syntax whose kernel compiles and multiplies correctly here, or
        None: a small matmul against NumPy, so a driver that offers the feature but gets it
        wrong falls back to SIMT kernels."""
        gpu = self.gpu
        if not (gpu.has_subgroup_matrix and gpu.has_f16 and gpu.has_subgroups):
            return None
        from meganeura.backends.wgsl.matmul import MATRIX_UNIT_SYNTAXES

        rng = np.random.default_rng(0)
        # f32 weights both ways round (both staging paths of the kernel), and f16 operands
        # that tile exactly (read by the matrix loads themselves).
        a, b, w = (
            rng.standard_normal(shape).astype(np.float16).astype(np.float32)
            for shape in ((150, 40), (40, 130), (136, 40))
        )
        h, k = (rng.standard_normal(shape).astype(np.float16) for shape in ((64, 32), (64, 32)))
        wants = [a.astype(np.float64) @ b, a.astype(np.float64) @ w.T]
        wants.append(h.astype(np.float64) @ k.astype(np.float64).T)
        graph = Graph()
        ta = graph.input("a", a.shape)
        outs = [ta @ graph.input("b", b.shape), ta @ graph.input("w", w.shape).T]
        outs.append(graph.input("h", h.shape, "f16") @ graph.input("k", k.shape, "f16").T)
        sources = (("a", a), ("b", b), ("w", w), ("h", h), ("k", k))
        feeds = {graph.inputs[n]: x for n, x in sources}
        for syntax in MATRIX_UNIT_SYNTAXES:
            options = {
                "matmul_precision": "high",
                "matrix_unit": syntax,
                "staged_matrix_units": True,
            }
            try:
                program = WebGPUProgram(self, graph, [o.id for o in outs], {}, options)
                program.run(feeds)
                gots = [program.read(o.id) for o in outs]
            except Exception as error:
                if DEBUG:
                    print(f"matrix units, syntax {syntax!r}: {error}", file=sys.stderr)
                continue
            if all(
                # f16 outputs round to 2^-11 relative
                np.linalg.norm(got - want)
                <= (1e-5 if got.dtype == np.float32 else 1e-3) * np.linalg.norm(want)
                for got, want in zip(gots, wants, strict=True)
            ):
                return syntax
            if DEBUG:
                print(f"matrix units, syntax {syntax!r}: wrong results", file=sys.stderr)
        return None

    def _staged_matrix_units_pay(self) -> bool:
        """Whether f32 matmuls run faster on matrix units (operands staged as f16 in
        workgroup memory) than on the f32 kernels here: a 2048^3 product timed both ways."""
        n, runs = 2048, 5
        rng = np.random.default_rng(0)
        a, b = (rng.standard_normal((n, n)).astype(np.float32) for _ in range(2))
        graph = Graph()
        out = graph.input("a", a.shape) @ graph.input("b", b.shape)
        feeds = {graph.inputs["a"]: a, graph.inputs["b"]: b}
        seconds = {}
        try:
            for staged in (True, False):
                options = {
                    "matmul_precision": "high",
                    "matrix_unit": self.matrix_unit,
                    "staged_matrix_units": staged,
                }
                program = WebGPUProgram(self, graph, [out.id], {}, options)
                program.run(feeds)
                result = program.buffers[program.plan.buffer_of[out.id]]
                self.device.queue.read_buffer(result, 0, 4)
                start = time.perf_counter()
                for _ in range(runs):
                    program.run({})
                self.device.queue.read_buffer(result, 0, 4)
                seconds[staged] = time.perf_counter() - start
        except Exception as error:
            if DEBUG:
                print(f"matrix units, staged timing: {error}", file=sys.stderr)
            return False
        if DEBUG:
            print(
                f"matrix units, {n}^3 staged {seconds[True]:.4f} s, f32 {seconds[False]:.4f} s",
                file=sys.stderr,
            )
        return seconds[True] < seconds[False]

    def buffer(self, nbytes: int, label: str = ""):
        return self.device.create_buffer(
            size=max(16, (nbytes + 15) // 16 * 16), usage=self.usage, label=label
        )

    def set_value(self, nid: int, array: np.ndarray) -> None:
        if nid not in self.persistent:
            self.persistent[nid] = self.buffer(
                array.nbytes if array.dtype != np.bool_ else array.size * 4
            )
        self.types[nid] = (array.shape, array.dtype)
        self.device.queue.write_buffer(self.persistent[nid], 0, _storage_bytes(array))

    def get_value(self, nid: int) -> np.ndarray:
        shape, dtype = self.types[nid]
        size = int(np.prod(shape)) * (4 if dtype == np.bool_ else dtype.itemsize)
        data = self.device.queue.read_buffer(self.persistent[nid], 0, max(size, 4))
        storage = np.uint32 if dtype == np.bool_ else dtype
        return np.frombuffer(data, storage, count=int(np.prod(shape))).reshape(shape).astype(dtype)

    def pipeline(self, wgsl: str, label: str):
        if wgsl not in self._pipelines:
            try:
                module = self.device.create_shader_module(code=wgsl, label=label)
                self._pipelines[wgsl] = self.device.create_compute_pipeline(
                    layout="auto", compute={"module": module, "entry_point": "main"}, label=label
                )
            except Exception as error:
                raise RuntimeError(f"kernel {label} failed to compile:\n{wgsl}\n{error}") from error
        return self._pipelines[wgsl]

    def compile(self, graph: Graph, roots: list[int], updates: dict[int, int]) -> WebGPUProgram:
        return WebGPUProgram(self, graph, roots, updates, self.codegen_options)


class WebGPUProgram:
    def __init__(self, executor: WebGPUExecutor, graph: Graph, roots, updates, options: dict):
        start = time.perf_counter()
        self.executor = executor
        self.graph = graph
        limit = executor.gpu.max_storage_buffers
        self.plan = make_plan(graph, roots, updates, max_reads=limit - 1)
        self.plan.options = dict(options)
        plan = self.plan
        buffers = {}
        for buf in plan.buffers:
            if buf.kind == "param":
                (nid,) = buf.nodes[:1]
                buffers[buf.id] = executor.persistent[nid]
            else:
                buffers[buf.id] = executor.buffer(buf.nbytes, f"{buf.kind}{buf.id}")
            if buf.kind == "constant":
                node = graph.nodes[buf.nodes[0]]
                executor.device.queue.write_buffer(
                    buffers[buf.id], 0, _storage_bytes(node.attrs["value"])
                )
        self.buffers = buffers
        self.inputs = {
            nid: buffers[plan.buffer_of[nid]]
            for nid in graph.inputs.values()
            if nid in plan.buffer_of
        }
        self.dispatches = []
        device = executor.device
        for kernel in plan.kernels:
            source = generate(plan, kernel)
            pipeline = executor.pipeline(source.wgsl, source.label)
            entries = [
                {
                    "binding": n,
                    "resource": {"buffer": buffers[b], "offset": 0, "size": buffers[b].size},
                }
                for n, b in enumerate(source.bindings)
            ]
            bind_group = device.create_bind_group(
                layout=pipeline.get_bind_group_layout(0), entries=entries
            )
            self.dispatches.append((pipeline, bind_group, source.grid))
            if DEBUG >= 2:
                print(f"--- {source.label} grid={source.grid}\n{source.wgsl}", file=sys.stderr)
        self.copies = [
            (buffers[plan.buffer_of[v]], buffers[plan.buffer_of[t]], graph.nodes[t].type.nbytes)
            for v, t in plan.copies
        ]
        if DEBUG:
            print(
                f"program: {len(plan.kernels)} kernels, {len(self.copies)} copies, "
                f"{plan.transient_bytes / 1e6:.2f} MB transient, "
                f"built in {time.perf_counter() - start:.2f} s",
                file=sys.stderr,
            )

    def run(self, feeds) -> None:
        queue = self.executor.device.queue
        for nid, array in feeds.items():
            if nid in self.inputs:
                queue.write_buffer(self.inputs[nid], 0, _storage_bytes(array))
        encoder = self.executor.device.create_command_encoder()
        cpass = encoder.begin_compute_pass()
        for pipeline, bind_group, grid in self.dispatches:
            cpass.set_pipeline(pipeline)
            cpass.set_bind_group(0, bind_group)
            cpass.dispatch_workgroups(*grid)
        cpass.end()
        for src, dst, nbytes in self.copies:
            encoder.copy_buffer_to_buffer(src, 0, dst, 0, (nbytes + 3) // 4 * 4)
        queue.submit([encoder.finish()])

    def read(self, nid: int) -> np.ndarray:
        ttype = self.graph.nodes[nid].type
        buf = self.buffers[self.plan.buffer_of[nid]]
        nbytes = max(
            4,
            (ttype.size * (4 if ttype.dtype == "bool" else numpy_dtype(ttype.dtype).itemsize) + 3)
            // 4
            * 4,
        )
        return _from_bytes(self.executor.device.queue.read_buffer(buf, 0, nbytes), ttype)
