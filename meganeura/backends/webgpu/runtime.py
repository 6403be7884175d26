"""The WebGPU runtime: programs of generated kernels over planned buffers.

Everything that can be prepared is prepared when a program is compiled: buffers, pipelines
(cached by WGSL text), bind groups and dispatch sizes. Running a program uploads its inputs,
submits one command buffer (every dispatch in one compute pass, then the update copies)
without waiting, and encodes the next run's while the device works. Reading a value waits
for the device.
"""

from __future__ import annotations

import functools
import importlib
import itertools
import os
import re
import sys
import time
from collections.abc import Sequence

import numpy as np

from meganeura.backends.webgpu.device import GPUDevice
from meganeura.backends.webgpu.matrix_units import (
    f32_on_units_pays,
    probe_matrix_units,
    workgroup_storage,
)
from meganeura.backends.webgpu.subgroups import probe_subgroup_sums
from meganeura.backends.wgsl.kernels import generate
from meganeura.backends.wgsl.matmul import pairable, product_variant, row_writable
from meganeura.debug import fused_nodes, kernel_error
from meganeura.graph import Graph, numpy_dtype
from meganeura.lower.plan import plan as make_plan

STAGED_BYTES = 1 << 20
# How a run's kernels are split into command buffers: (kernels in the first, growth factor
# of the next ones). Dawn records a command buffer's backend commands when it is submitted
# (2.8-7 us a kernel on the hosts of the H200 machines measured), and the device starts only
# once the first is submitted; each further submission costs the device about 15 us
# (timestamps around a run: 2.849 ms in one, 2.887 from 32 kernels doubling, 2.938 from 2).
# A program of GEMVs (a decoding step) runs its kernels about as fast as the host records
# them: it keeps the host's submissions few, from 32 kernels doubling. A program of tiled
# products (a prompt chunk, a training step) keeps the host waiting on the device: its first
# buffer is short, so the device starts early, and each next one three times as long is
# recorded while the device runs the ones before (a 128-token SmolLM2-135M prefill on an
# H200, alternating rounds in three processes on three hosts: 3.251 / 3.331 / 3.173 ms
# against 3.314 / 3.390 / 3.197 from 32 doubling).
# The third value lets the last command buffer take all that is left once at most `growth`
# times its size is: the device-bound buffers, recorded far faster than the device runs them,
# then end in one long buffer instead of a short extra one (a 154-kernel prefill: 8, 24, 122
# kernels instead of 8, 24, 72, 50; its device span 2.794 -> 2.777 ms on an H200, timestamps
# around real runs). A decoding step's buffers keep their sizes: its device would wait.
HOST_BOUND_CHUNKS = (32, 2, False)
DEVICE_BOUND_CHUNKS = (8, 3, True)
SPIN_SECONDS = 0.02  # how long a read waits for the device by polling before it blocks

# MEGANEURA_DEBUG=1 prints each program's kernels; 2 also prints their WGSL.
DEBUG = int(os.environ.get("MEGANEURA_DEBUG", "0") or 0)


# Names the generators number globally: buffers (by buffer id) and the emitter's values.
_GENERATED_NAMES = re.compile(r"\b(buf|v|ix)(\d+)\b")


def canonical_wgsl(wgsl: str) -> str:
    """`wgsl` with generated names renumbered in order of appearance, so that kernels that
    differ only in which buffers they bind or in name counters (the same kernel in every
    layer of a transformer) are one pipeline, compiled once."""
    names: dict[str, str] = {}

    def rename(match: re.Match) -> str:
        key = match.group(0)
        if key not in names:
            names[key] = f"{match.group(1)}{len(names)}"
        return names[key]

    return _GENERATED_NAMES.sub(rename, wgsl)


def _storage_bytes(array: np.ndarray):
    """`array` as the bytes its storage buffer holds: the array itself where it already is
    (contiguous, whole 4-byte words, not bool), else a converted copy."""
    if array.dtype != np.bool_ and array.flags.c_contiguous and array.nbytes % 4 == 0:
        return array  # (a prefill's 4 uploads: 31-38 us with a copy each, 22-24 without)
    if array.dtype == np.bool_:
        array = array.astype(np.uint32)
    data = np.ascontiguousarray(array).tobytes()
    # WebGPU writes whole 4-byte words: an odd count of f16 values needs a pad.
    return data + bytes(-len(data) % 4)


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
        # Start-up checks, once per device; each compiles kernels with the options before it.
        self.matrix_unit, self.f32_on_units, self.subgroup_sums = None, False, False
        self.matrix_unit = gpu.check("matrix_unit", lambda: probe_matrix_units(self))
        self.f32_on_units = (
            matmul_precision == "high"
            and self.matrix_unit is not None
            and gpu.check("f32_on_units", lambda: f32_on_units_pays(self))
        )
        self.subgroup_sums = gpu.check("subgroup_sums", lambda: probe_subgroup_sums(self))

    @property
    def codegen_options(self) -> dict:
        return {
            "matmul_precision": self.matmul_precision,
            "matrix_unit": self.matrix_unit,
            "f32_on_units": self.f32_on_units,
            "workgroup_storage": workgroup_storage(self),
            "subgroup_sums": self.subgroup_sums,
        }

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
        return self.pipelines([(wgsl, label)])[0]

    def pipelines(self, sources: list[tuple[str, str]]) -> list:
        """The compute pipelines of (WGSL, label) pairs, compiled once per distinct kernel.
        The new ones are all requested before any is waited for: Dawn compiles pipelines
        created asynchronously on its worker threads, so a program's kernels (hundreds for a
        language model) compile side by side instead of one after another."""
        texts = [canonical_wgsl(wgsl) for wgsl, _ in sources]
        pending = {}
        for wgsl, (_, label) in zip(texts, sources, strict=True):
            if wgsl in self._pipelines or wgsl in pending:
                continue
            try:
                module = self.device.create_shader_module(code=wgsl, label=label)
                pending[wgsl] = (
                    label,
                    self.device.create_compute_pipeline_async(
                        layout="auto",
                        compute={"module": module, "entry_point": "main"},
                        label=label,
                    ),
                )
            except Exception as error:
                raise RuntimeError(f"kernel {label} failed to compile:\n{wgsl}\n{error}") from error
        for wgsl, (label, promise) in pending.items():
            try:
                self._pipelines[wgsl] = promise.sync_wait()
            except Exception as error:
                raise RuntimeError(f"kernel {label} failed to compile:\n{wgsl}\n{error}") from error
        return [self._pipelines[wgsl] for wgsl in texts]

    def compile(self, graph: Graph, roots: list[int], updates: dict[int, int]) -> WebGPUProgram:
        return WebGPUProgram(self, graph, roots, updates, self.codegen_options)


def submission_chunks(graph: Graph, kernels, options: dict) -> tuple[int, int, bool]:
    """The command buffer split (first, growth, last takes the rest) of a program of plan
    `kernels`: for device-bound work when more of its products run as tiles than as GEMVs."""
    variants = [
        product_variant(graph, k.node if k.core is None else k.core, options) for k in kernels
    ]
    gemvs = variants.count("gemv")
    tiles = len(variants) - gemvs - variants.count(None)
    return DEVICE_BOUND_CHUNKS if tiles > gemvs else HOST_BOUND_CHUNKS


def _record(cpass, dispatches) -> None:
    """Record `dispatches` (pipeline, bind group, grid) into compute pass `cpass`. A decode
    step records a few hundred: where the binding exposes the C entry points it wraps (Dawn's
    `wgpuComputePassEncoder*` through cffi), they are called straight, skipping a Python
    method call and argument checks per command."""
    kind = type(cpass)
    direct = getattr(kind, "_dispatch_workgroups_function", None)
    null = getattr(sys.modules.get(kind.__module__), "_NULL", None)
    if direct is None or null is None or not hasattr(cpass, "_internal"):
        for pipeline, bind_group, grid in dispatches:
            cpass.set_pipeline(pipeline)
            cpass.set_bind_group(0, bind_group)
            cpass.dispatch_workgroups(*grid)
        return
    handle = cpass._internal
    set_pipeline, set_bind_group = kind._set_pipeline_function, kind._set_bind_group_function
    for pipeline, bind_group, (x, y, z) in dispatches:
        set_pipeline(handle, pipeline._internal)
        set_bind_group(handle, 0, bind_group._internal, 0, null)
        direct(handle, x, y, z)


class WebGPUProgram:
    def __init__(self, executor: WebGPUExecutor, graph: Graph, roots, updates, options: dict):
        start = time.perf_counter()
        self.executor = executor
        self.graph = graph
        limit = executor.gpu.max_storage_buffers
        self.plan = make_plan(
            graph,
            roots,
            updates,
            max_reads=limit - 1,
            pairable=lambda g, nid: pairable(g, nid, options),
            row_writable=lambda g, nid: row_writable(g, nid, options),
        )
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
        self.labels: list[str] = []
        self.kernel_of: list[int] = []  # the plan kernel of each dispatch
        device = executor.device
        sources = [generate(plan, kernel) for kernel in plan.kernels]
        parts = [part for source in sources for part in (source, *source.after)]
        pipelines = iter(executor.pipelines([(part.wgsl, part.label) for part in parts]))
        for index, source in enumerate(sources):
            scratch = [
                executor.buffer(n, f"scratch{index}.{j}") for j, n in enumerate(source.scratch)
            ]
            tables = []
            for table in source.tables:  # constant tables of the kernel's own
                tables.append(executor.buffer(table.nbytes, f"table{index}.{len(tables)}"))
                device.queue.write_buffer(tables[-1], 0, table)
            for part in (source, *source.after):
                pipeline = next(pipelines)
                bound = [buffers[b] for b in part.bindings] + scratch
                bound += tables if part is source else []
                entries = [
                    {"binding": n, "resource": {"buffer": buf, "offset": 0, "size": buf.size}}
                    for n, buf in enumerate(bound)
                ]
                bind_group = device.create_bind_group(
                    layout=pipeline.get_bind_group_layout(0), entries=entries
                )
                self.dispatches.append((pipeline, bind_group, part.grid))
                self.labels.append(part.label)
                self.kernel_of.append(index)
                if DEBUG >= 2:
                    print(f"--- {part.label} grid={part.grid}\n{part.wgsl}", file=sys.stderr)
        # Small roots are copied into mappable buffers in the step's own submission, so
        # reading one is a map, not another submission and a temporary buffer.
        map_usage = executor.wgpu.BufferUsage.MAP_READ | executor.wgpu.BufferUsage.COPY_DST
        self.staging = {}
        for nid in plan.roots:
            nbytes = _padded_nbytes(graph.nodes[nid].type)
            if nid in plan.buffer_of and nbytes <= STAGED_BYTES:
                staging = device.create_buffer(size=nbytes, usage=map_usage, label=f"read%{nid}")
                self.staging[nid] = (buffers[plan.buffer_of[nid]], staging, nbytes)
        self._fresh: set[int] = set()
        self._next = None  # the next run's command buffers, encoded ahead
        # Kernels in the first command buffer of a run (None: all in one) and the growth of
        # the next ones (see HOST_BOUND_CHUNKS). Earlier, on an H200: a 213-kernel decoding
        # step with its logits read back took 2.16 ms in one submission, 1.88 from 8 kernels
        # doubling, 1.78 from 32; a 128-token prefill 4.49, 4.16 and 4.18 ms.
        self.first_chunk: int | None
        self.first_chunk, self.chunk_growth, self.last_takes_rest = submission_chunks(
            plan.graph, plan.kernels, options
        )
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

    def run(
        self, feeds, check_finite: bool = False, copies: Sequence[tuple] = (), queued=False
    ) -> None:
        """Upload `feeds` and submit every kernel at once, without waiting. With
        `check_finite`, submit the kernels one by one and raise NonFiniteError at the first
        whose output holds an inf or NaN (this waits after every kernel).

        The commands do not depend on the inputs' values (those live in buffers), so after
        each submission the next run's command buffer is encoded while the device works:
        a program run again, a token of decoding or a training step, submits at once.

        `copies` (source buffer, destination buffer, bytes) follow the kernels in the same
        submission (see `buffer`). `queued` says the device is still busy with earlier work:
        the command buffers then go in one submission (one backend submit, rather than
        several that let an idle device start on the first kernels early)."""
        queue = self.executor.device.queue
        self._upload(feeds)
        if check_finite:
            self._fresh = set()  # the staged copies are of the previous run
            self._run_checked()
            queue.submit(self._encode(dispatch=False))
        else:
            commands, self._next = self._next or self._encode(), None
            if copies:
                encoder = self.executor.device.create_command_encoder()
                for src, dst, nbytes in copies:
                    encoder.copy_buffer_to_buffer(src, 0, dst, 0, nbytes)
                commands = [*commands, encoder.finish()]
            if queued:
                queue.submit(commands)
            else:
                for part in commands:
                    queue.submit([part])
            self._next = self._encode()
        self._fresh = set(self.staging)

    def buffer(self, nid: int):
        """The device buffer that holds node `nid`'s value (an input, or a value the program
        keeps, such as a root), for copies between runs on the device."""
        if nid not in self.plan.buffer_of:
            raise KeyError(f"{self.graph.nodes[nid].describe()} has no buffer in this program")
        return self.buffers[self.plan.buffer_of[nid]]

    def _upload(self, feeds) -> None:
        """Write the program's inputs among `feeds` into their buffers (queued in order)."""
        queue = self.executor.device.queue
        for nid, array in feeds.items():
            if nid in self.inputs:
                queue.write_buffer(self.inputs[nid], 0, _storage_bytes(array))

    def _encode(self, dispatch: bool = True) -> list:
        """Command buffers of every kernel (unless not `dispatch`), the last of them ending
        with the copies of the staged roots and of the updates. With `first_chunk` set, the
        kernels are split into command buffers of first_chunk, g first_chunk, g^2 first_chunk...
        kernels (g = `chunk_growth`), submitted one by one: the device starts on the first
        while the backend still records the rest. With `last_takes_rest`, a buffer takes all
        the kernels left once they number at most g times its size."""
        device = self.executor.device
        bounds = [0]
        size = self.first_chunk or len(self.dispatches)
        while bounds[-1] < len(self.dispatches):
            left = len(self.dispatches) - bounds[-1]
            rest = self.last_takes_rest and left <= size * self.chunk_growth
            bounds.append(bounds[-1] + (left if rest else min(left, size)))
            size *= self.chunk_growth
        parts = []
        for lo, hi in itertools.pairwise(bounds) if dispatch else []:
            encoder = device.create_command_encoder()
            cpass = encoder.begin_compute_pass()
            _record(cpass, self.dispatches[lo:hi])
            cpass.end()
            parts.append(encoder)
        if not parts:
            parts.append(device.create_command_encoder())
        encoder = parts[-1]
        for src, staging, nbytes in self.staging.values():
            encoder.copy_buffer_to_buffer(src, 0, staging, 0, nbytes)
        for src, dst, nbytes in self.copies:
            encoder.copy_buffer_to_buffer(src, 0, dst, 0, (nbytes + 3) // 4 * 4)
        return [part.finish() for part in parts]

    def _run_checked(self) -> None:
        device = self.executor.device
        parts: list[list[tuple]] = [[] for _ in self.plan.kernels]
        for dispatch, index in zip(self.dispatches, self.kernel_of, strict=True):
            parts[index].append(dispatch)
        for kernel, dispatches in zip(self.plan.kernels, parts, strict=True):
            encoder = device.create_command_encoder()
            cpass = encoder.begin_compute_pass()
            for pipeline, bind_group, grid in dispatches:
                cpass.set_pipeline(pipeline)
                cpass.set_bind_group(0, bind_group)
                cpass.dispatch_workgroups(*grid)
            cpass.end()
            device.queue.submit([encoder.finish()])
            # Side outputs are values the kernel computes on the way to its own.
            for nid in (*sorted(kernel.also), kernel.node):
                fused = fused_nodes(self.graph, nid, self.plan.materialized)
                label = f"{self.graph.nodes[nid].op}%{nid}"
                error = kernel_error(self.graph, nid, self.read(nid), kernel.reads, fused, label)
                if error is not None:
                    raise error

    def _timestamps(self, caller: str):
        if "timestamp-query" not in self.executor.gpu.features:
            raise RuntimeError(
                f"{caller}: {self.executor.description} does not offer timestamp-query"
            )
        return self.executor.device, self.executor.wgpu

    def device_time(self, feeds, repeats: int = 10) -> float:
        """Microseconds of device time per run: the program's kernels recorded `repeats`
        times over in one compute pass (so the program runs that many times: updates and
        state writes happen again each time), timestamps at the pass's beginning and end.
        Unlike `profile`, whose pass per kernel adds its own cost to each, this is the time
        the device needs for a run when the host keeps it fed. Needs timestamp-query."""
        device, wgpu = self._timestamps("device_time")
        self._upload(feeds)
        dispatches = self.dispatches * repeats
        micros = pass_microseconds(device, wgpu, lambda cpass: _record(cpass, dispatches))
        self._fresh = set()
        return micros / repeats

    def profile(self, feeds) -> list[tuple[str, tuple, float]]:
        """Run once with a GPU timestamp before and after every kernel, each in its own
        compute pass; returns (kernel label, grid, microseconds) per kernel in launch order.
        Each time includes a compute pass's own cost (about 5 us on an H200 through Vulkan,
        against about 2 us for a dependent launch inside one pass): their sum overstates a
        run, which `device_time` measures. Needs the adapter's timestamp-query feature."""
        device, wgpu = self._timestamps("profile")
        count = 2 * len(self.dispatches)
        queries = device.create_query_set(type="timestamp", count=count)
        resolved = device.create_buffer(
            size=8 * count, usage=wgpu.BufferUsage.QUERY_RESOLVE | wgpu.BufferUsage.COPY_SRC
        )
        self._upload(feeds)
        encoder = device.create_command_encoder()
        for n, (pipeline, bind_group, grid) in enumerate(self.dispatches):
            cpass = encoder.begin_compute_pass(
                timestamp_writes={
                    "query_set": queries,
                    "beginning_of_pass_write_index": 2 * n,
                    "end_of_pass_write_index": 2 * n + 1,
                }
            )
            cpass.set_pipeline(pipeline)
            cpass.set_bind_group(0, bind_group)
            cpass.dispatch_workgroups(*grid)
            cpass.end()
        encoder.resolve_query_set(queries, 0, count, resolved, 0)
        device.queue.submit([encoder.finish()])
        stamps = np.frombuffer(device.queue.read_buffer(resolved, 0, 8 * count), np.uint64)
        micros = (stamps[1::2].astype(np.int64) - stamps[0::2].astype(np.int64)) / 1e3
        self._fresh = set()
        return [
            (label, tuple(grid), float(us))
            for label, (_, _, grid), us in zip(self.labels, self.dispatches, micros, strict=True)
        ]

    def read(self, nid: int) -> np.ndarray:
        ttype = self.graph.nodes[nid].type
        if nid in self._fresh:
            _, staging, nbytes = self.staging[nid]
            return read_mappable(
                self.executor.wgpu, staging, nbytes, lambda view: _from_bytes(view, ttype)
            )
        buf = self.buffers[self.plan.buffer_of[nid]]
        data = self.executor.device.queue.read_buffer(buf, 0, _padded_nbytes(ttype))
        return _from_bytes(data, ttype)


def pass_microseconds(device, wgpu, record) -> float:
    """Device time, in microseconds, of one compute pass whose commands `record(cpass)`
    encodes: timestamps at the pass's beginning and end, then a wait for them. The device
    must offer timestamp-query."""
    queries = device.create_query_set(type="timestamp", count=2)
    usage = wgpu.BufferUsage.QUERY_RESOLVE | wgpu.BufferUsage.COPY_SRC
    resolved = device.create_buffer(size=16, usage=usage)
    encoder = device.create_command_encoder()
    cpass = encoder.begin_compute_pass(
        timestamp_writes={
            "query_set": queries,
            "beginning_of_pass_write_index": 0,
            "end_of_pass_write_index": 1,
        }
    )
    record(cpass)
    cpass.end()
    encoder.resolve_query_set(queries, 0, 2, resolved, 0)
    device.queue.submit([encoder.finish()])
    start, end = np.frombuffer(device.queue.read_buffer(resolved, 0, 16), np.uint64)
    return (int(end) - int(start)) / 1e3


def read_mappable(wgpu, buffer, nbytes: int, convert=bytes):
    """`convert` of the first `nbytes` of a MAP_READ buffer (a memoryview, valid only during
    the call: convert copies), once the work writing it is done.

    The wait spins first, as CUDA's synchronization does for a while before it yields: Dawn's
    blocking wait (`map_sync`) returned 0.2-0.3 ms after an H200 had finished through Vulkan,
    while asking Dawn for finished work in a loop (its ProcessEvents) sees the map within
    microseconds: a 128-token prefill took 4.17 ms with the blocking wait and 3.84-3.90
    spinning, a decoding step with its logits read back 1.58 and 1.40-1.45. After
    SPIN_SECONDS (or with a binding that has no ProcessEvents) it blocks."""
    promise = buffer.map_async(wgpu.MapMode.READ)
    pump = _event_pump(wgpu.__name__)
    if pump is not None:
        poll_until_done(promise, pump, SPIN_SECONDS)
    promise.sync_wait()
    try:
        # A view of the mapped memory itself (not a copy first): convert copies out of it.
        return convert(buffer.read_mapped(0, nbytes, copy=False))
    finally:
        buffer.unmap()


def poll_until_done(promise, pump, seconds: float) -> bool:
    """Call `pump` until `promise` (a wgpu-py GPUPromise) has its result or `seconds` pass;
    whether it has. The binding offers no public test of a promise: its state is read where
    it keeps it (`_state`, "pending" until the callback arrives), and without that attribute
    this returns at once and the caller blocks as before."""
    deadline = time.perf_counter() + seconds
    while getattr(promise, "_state", "") == "pending":
        if time.perf_counter() >= deadline:
            return False
        pump()
    return True


@functools.cache
def _event_pump(binding: str):
    """Dawn's `process_events` (wgpuInstanceProcessEvents, among its public extras) in the
    WebGPU binding named `binding`, or None where it has none (wgpu-native)."""
    try:
        extras = importlib.import_module(f"{binding}.backends.dawn.extras")
    except ImportError:
        return None
    return getattr(extras, "process_events", None)


def _padded_nbytes(ttype) -> int:
    itemsize = 4 if ttype.dtype == "bool" else numpy_dtype(ttype.dtype).itemsize
    return max(4, (ttype.size * itemsize + 3) // 4 * 4)
