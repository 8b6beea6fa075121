"""The engine core shared by every node role: scheduler, block manager, runner.

Its entry point, :class:`LLMEngine`, is imported from here (``from disagg.engine
import LLMEngine``); every other name from the module that defines it.
"""

from disagg.engine.llm_engine import LLMEngine

__all__ = ["LLMEngine"]
