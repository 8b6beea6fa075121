"""disagg: a disaggregated prefill/decode LLM serving system.

The engine core in this package is shared by every role: a prefill node and a
decode node run the same :class:`disagg.engine.LLMEngine`, differing
only in configuration and in which half of the KV connector is active.
"""

__version__ = "0.1.0"
