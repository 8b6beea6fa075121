"""The engine core shared by every node role: scheduler, block manager, runner."""

from disagg.engine.llm_engine import LLMEngine
from disagg.engine.outputs import KVExport, KVLoadTarget, RequestOutput
from disagg.engine.request import KVMode

__all__ = ["LLMEngine", "KVExport", "KVLoadTarget", "KVMode", "RequestOutput"]
