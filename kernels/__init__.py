"""fastalex.kernels: pure Triton kernels and their launchers (assert, allocate, launch).

Installed as `fastalex.kernels`. Imports triton, never fastalex's PyTorch layer (fastalex.ops checks
the arguments and raises; the launchers only assert them), never touches CUDA at import time.
_geometry holds the shape and dtype rules every layer shares, without triton. Import the op
modules directly: `from fastalex.kernels import conv2d`.
"""
