"""fastalex.kernels: pure Triton kernels and their launchers (validate, allocate, launch).

Installed as `fastalex.kernels`. Imports triton, never fastalex's PyTorch layer, never touches
CUDA at import time. Import the op modules directly: `from fastalex.kernels import conv2d`.
"""
