"""Model names → local Hugging Face directories and served names, without torch.

The router needs a model's tokenizer files and name but not its weights, so
this module imports neither torch nor transformers (unlike
:mod:`disagg.model.loader`). Names::

    "default" / "smollm2"   the embedded SmolLM2-135M-Instruct (converted on first use)
    an existing directory    itself (it must hold config.json)
    anything else            a Hugging Face hub id (the local cache first, then the hub)
"""

from __future__ import annotations

from pathlib import Path

from disagg.model.embedded import MODEL_NAME, ensure_embedded_model

EMBEDDED_ALIASES = ("default", "smollm2")
"""Names that mean the embedded model."""


def resolve_model_dir(name: str) -> Path:
    """Map a model name to a local HF-format directory (see the module docstring).

    Only the embedded model's one-off conversion imports torch (in
    :func:`disagg.model.embedded.ensure_embedded_model`).
    """
    if name.lower() in EMBEDDED_ALIASES:
        return ensure_embedded_model()
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise ValueError(f"{path} is not a model directory: it must be a directory "
                             "containing config.json and *.safetensors")
        return path
    if name.startswith((".", "/", "~")):
        raise ValueError(f"model directory {path} does not exist")
    return _download(name)


def served_model_name(model: str) -> str:
    """The name clients use for ``model`` unless told otherwise."""
    if model.lower() in EMBEDDED_ALIASES:
        return MODEL_NAME
    return Path(model).name or model


def _download(repo_id: str) -> Path:
    hint = ("pass a local directory with config.json and *.safetensors, or 'default' for the "
            "embedded SmolLM2-135M-Instruct")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise RuntimeError(f"{repo_id!r} is not a local directory and huggingface_hub is not "
                           f"installed to fetch it; {hint}") from None
    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except Exception:
        pass                                            # not cached: try the network
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:
        raise RuntimeError(f"could not fetch model {repo_id!r} from the Hugging Face hub: this "
                           f"machine is offline or the hub is unreachable "
                           f"({type(e).__name__}: {e}); {hint}") from e
