"""Device executors. Each keeps persistent values (parameters, optimizer state) and compiles
programs: the nodes needed for some roots, plus the updates applied after each run."""

from __future__ import annotations


def open_executor(device: str, matmul_precision: str = "highest"):
    """The executor for a device name ("auto", "gpu", "vulkan-cpu", "cpu"). The NumPy
    executor computes matmuls in f32 whatever the precision asked for."""
    from meganeura.backends.webgpu.device import resolve_device

    resolved = resolve_device(device)
    if resolved == "cpu":
        from meganeura.backends.numpy.executor import NumpyExecutor

        return NumpyExecutor()
    from meganeura.backends.webgpu.runtime import WebGPUExecutor

    return WebGPUExecutor(resolved, matmul_precision)
