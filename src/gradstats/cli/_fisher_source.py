"""The model a ``gradstats fisher SOURCE`` names, its tokenizer and its limits.

SOURCE is a Hugging Face model folder (``config.json``), a gradstats run folder
(``checkpoint.pt``), a config JSON file with a ``model_type`` key, or a registered model type
name; see :mod:`gradstats.cli._fisher`. Every failure is a one-line
:class:`~gradstats.errors.ConfigurationError` / :class:`~gradstats.errors.StateError` naming the
source: a missing folder or an unknown model type ("no such folder or model type", with a
"did you mean"), a config JSON that is not a JSON object, a run checkpoint that misses keys.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from gradstats._warnings import warn
from gradstats.cli._parser import suggest
from gradstats.errors import ConfigurationError, StateError

__all__ = ["encode", "load_source", "max_positions", "overrides", "vocab_size"]

_HF = "the Hugging Face sources need transformers (pip install 'gradstats[hf]')"


def overrides(pairs: tuple[str, ...]) -> dict[str, object]:
    """``{KEY: VALUE}`` of ``--set KEY=VALUE ...`` (a VALUE that parses as JSON is parsed)."""
    out: dict[str, object] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigurationError(f"--set expects KEY=VALUE; got {pair!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise ConfigurationError(_HF) from None
    return transformers


def _hf_folder(path: Path, overrides: dict[str, object]) -> tuple[Any, Any, str]:
    hf = _transformers()
    try:
        config = hf.AutoConfig.from_pretrained(path, local_files_only=True, **overrides)
        weights = any(path.glob("*.safetensors")) or any(path.glob("pytorch_model*.bin"))
        if weights and not overrides:
            model = hf.AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
            return model, _tokenizer(path), f"Hugging Face folder {path}"
        model = hf.AutoModelForCausalLM.from_config(config)
    except (OSError, KeyError, ValueError, TypeError) as error:
        reason = " ".join(str(error).split())[:160] or type(error).__name__
        raise ConfigurationError(f"cannot load the model in {path}: {reason}") from None
    warn(f"{path}: no weights (or config overrides): random initialisation")
    return model, _tokenizer(path), f"Hugging Face folder {path} (random weights)"


def _tokenizer(path: Path) -> Any:
    hf = _transformers()
    try:
        return hf.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError):
        return None


def _is_run_folder(path: Path) -> bool:
    """A gradstats run folder (``gradstats eqprop train`` output: ``checkpoint.pt``)."""
    return path.is_dir() and not (path / "config.json").is_file()


class _CharTokenizer:
    """The character vocabulary of a gradstats run (token id = position in ``vocab``)."""

    def __init__(self, vocab: str) -> None:
        self.index = {ch: i for i, ch in enumerate(vocab)}

    def __call__(self, text: str) -> dict[str, list[int]]:
        ids = [self.index[ch] for ch in text if ch in self.index]
        dropped = len(text) - len(ids)
        if dropped:
            warn(f"{dropped} characters are not in the run's vocabulary")
        return {"input_ids": ids}


def _load_run_folder(path: Path, overrides: dict[str, object]) -> tuple[Any, Any, str]:
    if not (path / "checkpoint.pt").is_file():
        raise ConfigurationError(
            f"{path} is neither a Hugging Face model folder (config.json) nor a gradstats run "
            "folder (checkpoint.pt)"
        )
    if overrides:
        raise ConfigurationError("--set applies to config sources, not to a gradstats run folder")
    from gradstats.eqprop.train import build_from_checkpoint, load_checkpoint

    state = load_checkpoint(path)
    model = build_from_checkpoint(state)
    corpus = state.get("corpus")
    vocab = corpus.get("vocab") if isinstance(corpus, dict) else None
    if vocab is not None and not isinstance(vocab, str):
        raise StateError(f"{path}: the checkpoint's corpus vocab is not a string")
    tokenizer = _CharTokenizer(vocab) if vocab else None
    what = f"gradstats run {path} ({state['model_class']}, step {state['step']})"
    return model, tokenizer, what


def _unknown_type(model_type: str) -> str:
    known = list(_transformers().CONFIG_MAPPING.keys())
    hint = suggest(model_type, known)
    examples = ", ".join(t for t in ("gpt2", "llama", "mistral", "qwen2") if t in known)
    return f"unknown model type {model_type!r}{hint}; {len(known)} known, e.g. {examples}"


def _from_config(
    config_dict: dict[str, Any], overrides: dict[str, object], what: str
) -> tuple[Any, Any, str]:
    hf = _transformers()
    model_type = config_dict.pop("model_type", None)
    if not isinstance(model_type, str):
        raise ConfigurationError(f"{what} has no 'model_type' (a string)")
    if model_type not in hf.CONFIG_MAPPING:
        raise ConfigurationError(f"{what}: {_unknown_type(model_type)}")
    try:
        config = hf.AutoConfig.for_model(model_type, **(config_dict | overrides))
        model = hf.AutoModelForCausalLM.from_config(config)
    except (ValueError, TypeError, KeyError, AttributeError) as error:
        reason = " ".join(str(error).split())[:160] or type(error).__name__
        raise ConfigurationError(f"{what}: cannot build a causal LM: {reason}") from None
    return model, None, what


def _config_file(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConfigurationError(f"config {path} is not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise ConfigurationError(
            f"config {path} must hold a JSON object with a 'model_type' key; it holds a "
            f"{type(data).__name__}"
        )
    return data


def load_source(source: str, overrides: dict[str, object]) -> tuple[Any, Any, str]:
    """(model, tokenizer or None, description) for SOURCE; see the module docstring."""
    if not source:
        raise ConfigurationError(
            "SOURCE is required: an HF model folder, a config JSON, a model type or a run folder"
        )
    path = Path(source)
    if path.is_dir():
        loader = _load_run_folder if _is_run_folder(path) else _hf_folder
        return loader(path, overrides)
    if path.suffix == ".json":
        if not path.is_file():
            raise FileNotFoundError(f"no config file {path}")
        return _from_config(_config_file(path), overrides, f"config {path}")
    if path.exists():
        raise ConfigurationError(
            f"{path} is a file, but not a config JSON (*.json): SOURCE is an HF model folder, "
            "a config JSON, a model type or a run folder"
        )
    if source not in _transformers().CONFIG_MAPPING:
        raise ConfigurationError(
            f"no such folder or model type: {source!r}; {_unknown_type(source)}"
        )
    return _from_config(
        {"model_type": source}, overrides, f"model type {source!r} (random weights)"
    )


def vocab_size(model: torch.nn.Module) -> int:
    """Rows of the output embedding (or the model's ``vocab_size``)."""
    get = getattr(model, "get_output_embeddings", None)
    output = get() if callable(get) else None
    if output is not None:
        return int(output.weight.shape[0])
    size = getattr(model, "vocab_size", None)
    if isinstance(size, int):
        return size
    raise ConfigurationError(f"cannot tell the vocabulary size of {type(model).__name__}")


def max_positions(model: torch.nn.Module) -> tuple[int, str] | None:
    """(the longest sequence the model's position embeddings allow, where it comes from), or
    ``None`` when it has no fixed limit that we know of."""
    config = getattr(model, "config", None)
    for key in ("n_positions", "max_position_embeddings"):
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value, key
    value = getattr(model, "block_size", None)  # the gradstats transformers
    if isinstance(value, int) and not isinstance(value, bool):
        return value, "block_size"
    return None


def encode(text: str, tokenizer: Any, vocab: int) -> list[int]:
    """Token ids of ``text``: the tokenizer's, or UTF-8 bytes (mod ``vocab`` if < 256)."""
    if tokenizer is not None:
        return list(tokenizer(text)["input_ids"])
    data = text.encode("utf-8")
    return list(data) if vocab >= 256 else [b % vocab for b in data]
