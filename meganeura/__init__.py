"""meganeura: e-graph optimized neural network training and inference on any GPU (WebGPU)."""

from meganeura import amp, functional, init, optim, schedules
from meganeura.autodiff import grad
from meganeura.graph import Graph, Tensor, TensorType
from meganeura.models.smollm2 import LlamaConfig, LoraConfig
from meganeura.pretrained import load_pretrained
from meganeura.session import Session, build

__version__ = "0.1.0"

__all__ = [
    "Graph",
    "LlamaConfig",
    "LoraConfig",
    "Session",
    "Tensor",
    "TensorType",
    "amp",
    "build",
    "functional",
    "grad",
    "init",
    "load_pretrained",
    "optim",
    "schedules",
]
