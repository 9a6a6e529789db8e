"""Measuring fastalex: benchmarks against cuDNN, the GPU check, committed results."""
