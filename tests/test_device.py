import json
import os
import subprocess
import sys

import pytest

from meganeura.backends.webgpu.device import (
    DEVICE_NAMES,
    AdapterInfo,
    DeviceError,
    GPUDevice,
    current_implementation,
    list_adapters,
    resolve_device,
    select_adapter,
    webgpu_module,
)
from meganeura.cli import main


def fake_adapter(name: str, backend: str, adapter_type: str) -> AdapterInfo:
    return AdapterInfo(
        name=name,
        backend=backend,
        adapter_type=adapter_type,
        vendor="test",
        description=name,
        features=[],
        limits={},
        implementation="dawn",
    )


LLVMPIPE_GL = fake_adapter("llvmpipe", "OpenGL", "CPU")
LAVAPIPE = fake_adapter("lavapipe", "Vulkan", "CPU")
INTEGRATED = fake_adapter("iGPU", "Vulkan", "IntegratedGPU")
DISCRETE = fake_adapter("dGPU", "Vulkan", "DiscreteGPU")
DISCRETE_GL = fake_adapter("dGPU over GL", "OpenGL", "DiscreteGPU")


def test_list_adapters_returns_adapter_infos():
    adapters = list_adapters()
    assert all(isinstance(a, AdapterInfo) for a in adapters)
    for adapter in adapters:
        assert adapter.implementation == current_implementation()
        assert adapter.features == sorted(adapter.features)


def test_cpu_is_the_numpy_executor():
    assert resolve_device("cpu") == "cpu"


def test_unknown_device_names_valid_options():
    with pytest.raises(DeviceError) as error:
        resolve_device("cuda")
    message = str(error.value)
    assert "'cuda'" in message
    for name in DEVICE_NAMES:
        assert name in message
    for adapter in list_adapters():
        assert adapter.name in message


def test_invalid_implementation_names_valid_ones(monkeypatch):
    monkeypatch.setenv("MEGANEURA_WEBGPU", "vulkan")
    with pytest.raises(ValueError, match="dawn, wgpu-native"):
        webgpu_module()


def test_auto_prefers_discrete_then_integrated_then_cpu():
    assert select_adapter("auto", [LAVAPIPE, INTEGRATED, DISCRETE]) is DISCRETE
    assert select_adapter("auto", [LLVMPIPE_GL, INTEGRATED]) is INTEGRATED
    assert select_adapter("auto", [LLVMPIPE_GL, LAVAPIPE, DISCRETE_GL]) is None
    assert select_adapter("auto", []) is None


def test_gpu_without_hardware_lists_adapters():
    with pytest.raises(DeviceError) as error:
        select_adapter("gpu", [LLVMPIPE_GL, LAVAPIPE, DISCRETE_GL])
    message = str(error.value)
    assert "llvmpipe [OpenGL, CPU, dawn]" in message
    assert "dGPU over GL [OpenGL, DiscreteGPU, dawn]" in message
    assert "vulkan-cpu" in message


def test_vulkan_cpu_never_takes_opengl():
    assert select_adapter("vulkan-cpu", [LLVMPIPE_GL, LAVAPIPE]) is LAVAPIPE
    with pytest.raises(DeviceError, match="lavapipe"):
        select_adapter("vulkan-cpu", [LLVMPIPE_GL, DISCRETE])


def check_vulkan_cpu_device(device: GPUDevice | str) -> None:
    assert isinstance(device, GPUDevice)
    assert device.info.backend == "Vulkan"
    assert device.info.adapter_type == "CPU"
    assert device.max_storage_buffers >= 8
    assert device.limits["max-buffer-size"] == device.info.limits["max-buffer-size"]


def require_vulkan_cpu(implementation: str) -> None:
    adapters = list_adapters(implementation)
    if not any(a.backend == "Vulkan" and a.adapter_type == "CPU" for a in adapters):
        found = "; ".join(a.summary() for a in adapters) or "none"
        pytest.skip(f"no CPU Vulkan adapter (lavapipe) through {implementation}; found: {found}")


@pytest.mark.lavapipe
def test_vulkan_cpu_through_dawn():
    require_vulkan_cpu("dawn")
    device = resolve_device("vulkan-cpu", "dawn")
    check_vulkan_cpu_device(device)
    assert device.wgpu.__name__ == "wgpudawn"
    assert device.has_f16 and device.has_subgroups
    assert resolve_device("vulkan-cpu", "dawn") is device


@pytest.mark.lavapipe
def test_vulkan_cpu_through_wgpu_native():
    require_vulkan_cpu("wgpu-native")
    device = resolve_device("vulkan-cpu", "wgpu-native")
    check_vulkan_cpu_device(device)
    assert device.wgpu.__name__ == "wgpu"
    assert device.info.implementation == "wgpu-native"


@pytest.mark.lavapipe
def test_env_var_selects_wgpu_native():
    require_vulkan_cpu("wgpu-native")
    script = (
        "import json\n"
        "from meganeura.backends.webgpu.device import resolve_device\n"
        "d = resolve_device('vulkan-cpu')\n"
        "print(json.dumps([d.wgpu.__name__, d.info.implementation, d.info.backend]))\n"
    )
    env = dict(os.environ, MEGANEURA_WEBGPU="wgpu-native")
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1]) == ["wgpu", "wgpu-native", "Vulkan"]


@pytest.mark.gpu
def test_gpu_device_is_hardware():
    device = resolve_device("gpu")
    assert isinstance(device, GPUDevice)
    assert device.info.is_hardware
    assert resolve_device("auto") is device


def test_info_command(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"WebGPU implementation: {current_implementation()}" in out
    assert 'device="auto" picks:' in out
    for adapter in list_adapters():
        assert adapter.name in out


def test_info_all_implementations(capsys):
    assert main(["info", "--all-implementations"]) == 0
    out = capsys.readouterr().out
    assert "WebGPU implementation: dawn" in out
    assert "WebGPU implementation: wgpu-native" in out


def test_info_reports_bad_implementation_cleanly(monkeypatch, capsys):
    monkeypatch.setenv("MEGANEURA_WEBGPU", "metal")
    with pytest.raises(SystemExit) as exit_info:
        main(["info"])
    assert exit_info.value.code == 2
    assert "MEGANEURA_WEBGPU='metal'" in capsys.readouterr().err


def test_ops_command_lists_every_op_with_a_lowering(capsys):
    import json

    from meganeura.ops import all_ops

    assert main(["ops", "--json"]) == 0
    rows = {row["op"]: row for row in json.loads(capsys.readouterr().out)}
    assert set(rows) == set(all_ops())
    missing = [name for name, row in rows.items() if not row["wgsl"] or not row["reference"]]
    assert missing == []
    assert main(["ops"]) == 0
    assert f"{len(rows)} ops" in capsys.readouterr().out


@pytest.mark.lavapipe
def test_pipelines_compile_together_once_each_and_name_a_failing_kernel():
    from meganeura.backends import open_executor

    executor = open_executor("vulkan-cpu")
    kernel = (
        "@group(0) @binding(0) var<storage, read_write> b: array<f32>;\n"
        "@compute @workgroup_size(1) fn main() { b[0] = 1.0; }"
    )
    first, again = executor.pipelines([(kernel, "one"), (kernel, "same")])
    assert first is again and executor.pipeline(kernel, "later") is first
    with pytest.raises(RuntimeError, match="kernel broken failed to compile"):
        executor.pipelines([(kernel, "one"), ("@compute @workgroup_size(1) fn main() {", "broken")])


@pytest.mark.lavapipe
@pytest.mark.parametrize("wait", ["spin", "block", "no pump"])
def test_reads_poll_for_the_device_then_block(monkeypatch, wait):
    """A read spins on Dawn's ProcessEvents for up to SPIN_SECONDS, then blocks; without the
    spin (a deadline of zero, or a binding without ProcessEvents) it blocks at once. Each way
    it reads what the run wrote, run after run."""
    import numpy as np

    from meganeura import Graph, build
    from meganeura.backends.webgpu import runtime

    assert runtime._event_pump("wgpudawn") is not None
    assert runtime._event_pump("meganeura") is None  # no such extras: block
    if wait == "block":
        monkeypatch.setattr(runtime, "SPIN_SECONDS", 0.0)
    if wait == "no pump":
        monkeypatch.setattr(runtime, "_event_pump", lambda binding: None)
    g = Graph()
    g.output("y", g.input("x", (300,)) * 2.0)
    session = build(g, device="vulkan-cpu")
    for step in range(3):
        x = np.arange(300, dtype=np.float32) + step
        np.testing.assert_array_equal(session.run({"x": x})["y"], 2 * x)


@pytest.mark.lavapipe
def test_polling_sees_the_map_complete():
    """The spin must see the device finish (not run out its time and fall back to blocking,
    which would make every read cost SPIN_SECONDS)."""
    import time

    from meganeura.backends.webgpu import runtime

    gpu = resolve_device("vulkan-cpu")
    wgpu, device = gpu.wgpu, gpu.device
    usage = wgpu.BufferUsage
    src = device.create_buffer(size=1 << 20, usage=usage.COPY_SRC | usage.COPY_DST)
    dst = device.create_buffer(size=1 << 20, usage=usage.MAP_READ | usage.COPY_DST)
    encoder = device.create_command_encoder()
    encoder.copy_buffer_to_buffer(src, 0, dst, 0, 1 << 20)
    device.queue.submit([encoder.finish()])
    promise = dst.map_async(wgpu.MapMode.READ)
    start = time.perf_counter()
    assert runtime.poll_until_done(promise, runtime._event_pump(wgpu.__name__), 30.0)
    assert time.perf_counter() - start < 10.0
    promise.sync_wait()
    dst.unmap()


@pytest.mark.lavapipe
@pytest.mark.parametrize(("checks", "unchecked"), [("", True), ("1", False), ("0", True)])
def test_bounds_checks_are_off_unless_asked_for(checks, unchecked):
    require_vulkan_cpu("dawn")
    script = (
        "from wgpudawn.backends.dawn.extras import get_toggles\n"
        "from meganeura.backends.webgpu.device import resolve_device\n"
        "d = resolve_device('vulkan-cpu', 'dawn')\n"
        "print('disable_robustness' in get_toggles(d.device))\n"
    )
    env = dict(os.environ, MEGANEURA_BOUNDS_CHECKS=checks)
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == str(unchecked)
