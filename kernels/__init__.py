"""Triton kernels (installed as pyseqk.kernels): device code and thin host launchers."""
