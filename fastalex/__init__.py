"""fastalex: AlexNet with fused Triton kernels.

    import fastalex
    y = fastalex.functional.conv2d_relu(x, w, b, stride=4)      # conv + bias + ReLU, one kernel
    fastalex.backend_info("cuda")                                 # which backend runs, and why

Importing fastalex never touches CUDA and does not import triton; the kernels load on first use.
"""

from fastalex import functional, nn, optim
from fastalex.model import AlexNet
from fastalex.trainer import Trainer, TrainingDiverged
from fastalex._backend import BACKENDS, BackendInfo, backend, backend_info

__version__ = "0.1.0"

__all__ = ["AlexNet", "BACKENDS", "Trainer", "TrainingDiverged", "BackendInfo", "backend", "backend_info", "functional", "nn", "optim", "__version__"]
