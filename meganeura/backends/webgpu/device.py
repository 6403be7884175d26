"""WebGPU adapters and devices: which implementation, which adapter, one device each.

Two packages expose wgpu-py's API: ``wgpudawn`` (Dawn, the default) and ``wgpu``
(wgpu-native). The environment variable ``MEGANEURA_WEBGPU`` picks one. Everything
else in the runtime is written against that shared API.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

IMPLEMENTATIONS = ("dawn", "wgpu-native")
DEVICE_NAMES = ("auto", "gpu", "vulkan-cpu", "cpu")
ENV_VAR = "MEGANEURA_WEBGPU"

HARDWARE_TYPES = ("DiscreteGPU", "IntegratedGPU")
HARDWARE_BACKENDS = ("Vulkan", "Metal", "D3D12")

# Dawn only offers shader-f16 on NVIDIA and subgroup matrices (tensor cores) with these.
DAWN_INSTANCE_TOGGLES = ["allow_unsafe_apis", "vulkan_enable_f16_on_nvidia"]
# Dawn clamps every index into storage and workgroup arrays unless told not to, as a browser
# must for pages it cannot trust. These kernels are generated and keep their own indices in
# range (partial tiles are guarded); without the clamps a 128-token SmolLM2 prefill took
# 3.30 ms of an H200's time instead of 3.50. Chrome's Skia Graphite and native Dawn
# applications in release builds turn them off too. MEGANEURA_BOUNDS_CHECKS=1 keeps them:
# an index out of range then reads a clamped element instead of undefined memory.
BOUNDS_CHECKS_ENV = "MEGANEURA_BOUNDS_CHECKS"
DAWN_UNCHECKED_TOGGLES = ["disable_robustness"]
# Dawn rounds timestamps to ~100 us unless told not to; kernel profiles need the real ones.
DAWN_DISABLED_TOGGLES = ["timestamp_quantization"]

# Limits a compute runtime wants as high as the adapter allows (the defaults are low).
COMPUTE_LIMITS = (
    "max-storage-buffers-per-shader-stage",
    "max-storage-buffer-binding-size",
    "max-buffer-size",
    "max-compute-workgroup-storage-size",
    "max-compute-invocations-per-workgroup",
    "max-compute-workgroup-size-x",
    "max-compute-workgroup-size-y",
    "max-compute-workgroup-size-z",
    "max-compute-workgroups-per-dimension",
    "max-immediate-size",
)

# Requested whenever the adapter offers them. Dawn names subgroups "subgroups";
# wgpu-native offers its native "subgroup" instead.
OPTIONAL_FEATURES = (
    "shader-f16",
    "subgroups",
    "subgroup",
    "timestamp-query",
    "chromium-experimental-subgroup-matrix",
    "immediates",
)


class DeviceError(RuntimeError):
    """A device name that is unknown, or names a device this machine does not have."""


class ImplementationError(ValueError):
    """A WebGPU implementation name that is not one of IMPLEMENTATIONS."""


def current_implementation() -> str:
    """The WebGPU implementation that ``MEGANEURA_WEBGPU`` selects (``dawn`` if unset)."""
    name = os.environ.get(ENV_VAR, "dawn").strip() or "dawn"
    if name not in IMPLEMENTATIONS:
        valid = ", ".join(IMPLEMENTATIONS)
        raise ImplementationError(
            f"{ENV_VAR}={name!r} is not a WebGPU implementation; valid: {valid}"
        )
    return name


def webgpu_module(implementation: str | None = None) -> ModuleType:
    """The module with wgpu-py's API for ``implementation`` (default: ``MEGANEURA_WEBGPU``)."""
    return _load_module(implementation or current_implementation())


def dawn_toggles() -> list[str]:
    """The Dawn toggles meganeura enables: its features, and unless ``MEGANEURA_BOUNDS_CHECKS``
    is set (to anything but 0 or empty), no bounds checks in kernels."""
    checks = os.environ.get(BOUNDS_CHECKS_ENV, "").strip() not in ("", "0")
    return DAWN_INSTANCE_TOGGLES + ([] if checks else DAWN_UNCHECKED_TOGGLES)


@functools.cache
def _load_module(implementation: str) -> ModuleType:
    if implementation == "dawn":
        from wgpudawn.backends.dawn import extras

        try:
            extras.set_instance_extras(
                enable_toggles=dawn_toggles(), disable_toggles=DAWN_DISABLED_TOGGLES
            )
        except RuntimeError as error:
            raise RuntimeError(
                "Dawn's instance was created before meganeura could set its toggles "
                f"({', '.join(dawn_toggles())}): call webgpu_module() before "
                "requesting adapters from wgpudawn directly"
            ) from error
        import wgpudawn

        return wgpudawn
    if implementation == "wgpu-native":
        import wgpu

        return wgpu
    raise ImplementationError(
        f"unknown WebGPU implementation {implementation!r}; valid: {', '.join(IMPLEMENTATIONS)}"
    )


@dataclass
class AdapterInfo:
    """What one WebGPU adapter is and offers."""

    name: str
    backend: str
    adapter_type: str
    vendor: str
    description: str
    features: list[str]
    limits: dict[str, int]
    implementation: str

    @property
    def is_hardware(self) -> bool:
        return self.adapter_type in HARDWARE_TYPES and self.backend in HARDWARE_BACKENDS

    def summary(self) -> str:
        return f"{self.name} [{self.backend}, {self.adapter_type}, {self.implementation}]"


def _adapter_info(adapter: Any, implementation: str) -> AdapterInfo:
    info = adapter.info
    return AdapterInfo(
        name=info.get("device") or info.get("description") or "unnamed adapter",
        backend=info.get("backend_type", "Unknown"),
        adapter_type=info.get("adapter_type", "Unknown"),
        vendor=info.get("vendor", ""),
        description=info.get("description", ""),
        features=sorted(adapter.features),
        limits=dict(adapter.limits),
        implementation=implementation,
    )


@dataclass(frozen=True)
class _Enumeration:
    adapters: list[Any]
    infos: list[AdapterInfo]
    failure: str | None


@functools.cache
def _enumerate(implementation: str) -> _Enumeration:
    # Enumerated once per process: a Dawn adapter can create only one device, so the
    # adapters that devices come from must stay the same objects.
    try:
        adapters = list(webgpu_module(implementation).gpu.enumerate_adapters_sync())
    except (ImportError, OSError, RuntimeError) as error:
        return _Enumeration([], [], f"{type(error).__name__}: {error}")
    infos = [_adapter_info(adapter, implementation) for adapter in adapters]
    return _Enumeration(adapters, infos, None)


def list_adapters(implementation: str | None = None) -> list[AdapterInfo]:
    """Every adapter the implementation sees; empty when there is none or it cannot load."""
    return list(_enumerate(implementation or current_implementation()).infos)


def select_adapter(device: str, adapters: list[AdapterInfo]) -> AdapterInfo | None:
    """The adapter that ``device`` names among ``adapters``; None means the NumPy executor."""
    if device not in DEVICE_NAMES:
        raise DeviceError(f"unknown device {device!r}. {_available(adapters)}")
    if device == "cpu":
        return None
    hardware = sorted(
        (a for a in adapters if a.is_hardware), key=lambda a: a.adapter_type != "DiscreteGPU"
    )
    if device == "auto":
        return hardware[0] if hardware else None
    if device == "gpu":
        if hardware:
            return hardware[0]
        raise DeviceError(
            "device='gpu' needs a hardware GPU adapter (DiscreteGPU or IntegratedGPU through "
            f"{', '.join(HARDWARE_BACKENDS)}), and there is none. {_available(adapters)}"
        )
    vulkan_cpu = [a for a in adapters if a.adapter_type == "CPU" and a.backend == "Vulkan"]
    if vulkan_cpu:
        return vulkan_cpu[0]
    raise DeviceError(
        "device='vulkan-cpu' needs a CPU Vulkan adapter (Mesa's lavapipe, package "
        f"mesa-vulkan-drivers), and there is none. {_available(adapters)}"
    )


def _available(adapters: list[AdapterInfo]) -> str:
    listing = "; ".join(a.summary() for a in adapters) or "none"
    return f"Valid devices: {', '.join(DEVICE_NAMES)}. Adapters found: {listing}."


@dataclass(eq=False)
class GPUDevice:
    """An open WebGPU device and what it was granted."""

    wgpu: ModuleType = field(repr=False)
    adapter: Any = field(repr=False)
    device: Any = field(repr=False)
    info: AdapterInfo
    features: set[str] = field(repr=False)
    limits: dict[str, int] = field(repr=False)
    # Results of the executors' start-up checks (matrix units, subgroup sums), made once per
    # device: every session on it shares them.
    checks: dict[str, Any] = field(default_factory=dict, repr=False)

    def check(self, name: str, run):
        """The result of start-up check `name`, running `run()` the first time."""
        if name not in self.checks:
            self.checks[name] = run()
        return self.checks[name]

    @property
    def has_f16(self) -> bool:
        return "shader-f16" in self.features

    @property
    def has_subgroups(self) -> bool:
        return bool({"subgroups", "subgroup"} & self.features)

    @property
    def has_subgroup_matrix(self) -> bool:
        return "chromium-experimental-subgroup-matrix" in self.features

    @property
    def max_storage_buffers(self) -> int:
        return self.limits["max-storage-buffers-per-shader-stage"]


def resolve_device(device: str, implementation: str | None = None) -> str | GPUDevice:
    """``"cpu"`` for the NumPy executor, or the open GPUDevice that ``device`` names.

    ``auto``: the first hardware GPU (discrete preferred), else ``cpu``. ``gpu``: a
    hardware GPU or DeviceError. ``vulkan-cpu``: a CPU Vulkan adapter (lavapipe),
    never an OpenGL one. ``cpu``: the NumPy executor.
    """
    implementation = implementation or current_implementation()
    if device == "cpu":
        return "cpu"
    enumeration = _enumerate(implementation)
    try:
        chosen = select_adapter(device, enumeration.infos)
    except DeviceError as error:
        if enumeration.failure:
            raise DeviceError(f"{error} ({implementation}: {enumeration.failure})") from None
        raise
    if chosen is None:
        return "cpu"
    index = next(i for i, info in enumerate(enumeration.infos) if info is chosen)
    return _open_device(implementation, index)


@functools.cache
def _open_device(implementation: str, index: int) -> GPUDevice:
    enumeration = _enumerate(implementation)
    adapter, info = enumeration.adapters[index], enumeration.infos[index]
    offered = set(info.features)
    features = [name for name in OPTIONAL_FEATURES if name in offered]
    limits = {name: info.limits[name] for name in COMPUTE_LIMITS if name in info.limits}
    try:
        device = adapter.request_device_sync(
            label="meganeura", required_features=features, required_limits=limits
        )
    except RuntimeError as error:
        raise DeviceError(
            f"could not open {info.summary()} with features {features}: {error}"
        ) from error
    return GPUDevice(
        wgpu=webgpu_module(implementation),
        adapter=adapter,
        device=device,
        info=info,
        features=set(device.features),
        limits=dict(device.limits),
    )
