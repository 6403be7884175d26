import os
import tempfile

import pytest
from hypothesis import settings

# CI draws the same examples every run, so a red build is reproducible from its log.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

# Mesa warns on every adapter request when XDG_RUNTIME_DIR is unset.
os.environ.setdefault("XDG_RUNTIME_DIR", tempfile.mkdtemp(prefix="meganeura-xdg-"))

from meganeura.backends.webgpu.device import list_adapters  # noqa: E402 - after XDG_RUNTIME_DIR


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    marked = [item for item in items if "gpu" in item.keywords or "lavapipe" in item.keywords]
    if not marked:
        return
    adapters = list_adapters()
    found = "; ".join(a.summary() for a in adapters) or "no WebGPU adapter at all"
    if not any(a.is_hardware for a in adapters):
        skip_gpu = pytest.mark.skip(reason=f"needs a hardware GPU adapter; found: {found}")
        for item in marked:
            if "gpu" in item.keywords:
                item.add_marker(skip_gpu)
    if not any(a.backend == "Vulkan" for a in adapters):
        skip_vulkan = pytest.mark.skip(
            reason=f"needs a Vulkan adapter (install mesa-vulkan-drivers >= 25); found: {found}"
        )
        for item in marked:
            if "lavapipe" in item.keywords:
                item.add_marker(skip_vulkan)
