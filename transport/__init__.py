"""KV-block transport (to be built): ZeroMQ, shared memory and CUDA IPC
implementations of the worker half of :mod:`disagg.connector`."""
