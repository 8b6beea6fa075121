"""Hand-written kernels for the engine's hot path, with PyTorch references.

``ops`` is what the model calls (it picks the kernel or the reference per
call); ``cpu`` builds the C++ CPU kernels (``cpu_ops.cpp``) on first use.
"""
