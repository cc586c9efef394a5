"""The model a ``gradstats fisher SOURCE`` names, its tokenizer and its limits.

SOURCE is a Hugging Face model folder (``config.json``), a gradstats run folder
(``checkpoint.pt``), a config JSON file with a ``model_type`` key, or a registered model type
name; see :mod:`gradstats.cli._fisher`. Every failure is a one-line
:class:`~gradstats.errors.ConfigurationError` / :class:`~gradstats.errors.StateError` naming the
source: a missing folder or an unknown model type ("no such folder or model type", with a
"did you mean"), a config JSON that is not a JSON object, a run checkpoint that misses keys,
a ``--set`` key the config does not have (the valid keys are listed), a model above
:data:`MAX_PARAMETERS` parameters without ``--allow-large`` (the count is printed first).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from gradstats._warnings import warn
from gradstats.cli._parser import suggest
from gradstats.errors import ConfigurationError, StateError

__all__ = [
    "MAX_PARAMETERS",
    "encode",
    "is_run_source",
    "load_source",
    "max_positions",
    "overrides",
    "run_corpus_text",
    "vocab_size",
]

_HF = "the Hugging Face sources need transformers (pip install 'gradstats[hf]')"
MAX_PARAMETERS = 400_000_000
"""Models above this many parameters are refused unless ``--allow-large`` (a 7B default config
takes > 100 GB with the Fisher state; GPT-2 medium, 355M, still fits)."""


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
    transformers.logging.set_verbosity_error()  # config remarks would break the one-line errors
    return transformers


def _check_keys(config_class: Any, keys: list[str], what: str) -> None:
    """Every ``--set`` key must be a field of the config class (else it would be ignored)."""
    if not keys:
        return
    try:
        fields = set(config_class().to_dict())
        generic = set(_transformers().PretrainedConfig().to_dict())
    except (TypeError, ValueError, KeyError):  # a config that cannot be built bare: no check
        return
    fields |= set(getattr(config_class, "attribute_map", {}))
    for key in keys:
        if key not in fields and key not in generic:
            specific = sorted(fields - generic)
            alias = _ALIASES.get(key)
            hint = suggest(key, specific)
            if not hint and alias in fields:
                hint = f" (did you mean {alias}?)"
            raise ConfigurationError(
                f"{what}: --set {key}: {getattr(config_class, 'model_type', '')} configs have no "
                f"key {key!r}{hint}; valid keys: {', '.join(specific)}"
            )


# GPT-2 style names and their names in most other Hugging Face configs (for the hint)
_ALIASES = {
    "n_layer": "num_hidden_layers",
    "n_layers": "num_hidden_layers",
    "n_embd": "hidden_size",
    "n_head": "num_attention_heads",
    "n_heads": "num_attention_heads",
    "n_inner": "intermediate_size",
    "n_positions": "max_position_embeddings",
    "num_layers": "num_hidden_layers",
}


def _strict_errors() -> tuple[type[Exception], ...]:
    """huggingface_hub's validation error of a config field set to a value of the wrong type
    (``--set n_layer=abc``): an ``Exception``, not a ``ValueError``, in recent versions."""
    try:
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:
        return ()
    return (StrictDataclassError,)


_SIZES = ("num_hidden_layers", "hidden_size", "num_attention_heads", "vocab_size")


def _check_sizes(config: Any, what: str) -> None:
    """The config's layer count, width, heads and vocabulary must be >= 1 (``--set
    n_layer=-1`` builds a model that fails only in the middle of the collection)."""
    for name in _SIZES:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value < 1:
            raise ConfigurationError(f"{what}: {name} must be >= 1; got {value}")


def _checked_size(hf: Any, config: Any, what: str, allow_large: bool) -> None:
    """State the parameter count (built on the meta device: no memory) before building, and
    refuse models above :data:`MAX_PARAMETERS` unless ``allow_large``."""
    _check_sizes(config, what)
    try:
        with torch.device("meta"):
            meta = hf.AutoModelForCausalLM.from_config(config)
    except (ValueError, TypeError, KeyError, AttributeError, RuntimeError, NotImplementedError):
        return  # the real build below reports what is wrong
    count = sum(p.numel() for p in meta.parameters())
    del meta
    print(f"{what}: {_human(count)} parameters", flush=True)  # before the (slow) build
    if count > MAX_PARAMETERS and not allow_large:
        raise ConfigurationError(
            f"{what} has {_human(count)} parameters, above the {_human(MAX_PARAMETERS)} limit of "
            "gradstats fisher (the Fisher state alone takes 16 bytes per parameter); shrink it "
            "with --set (e.g. the number of layers and the width) or pass --allow-large"
        )


def _human(count: int) -> str:
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if count >= scale:
            return f"{count / scale:.3g}{unit}"
    return str(count)


def _hf_folder(
    path: Path, overrides: dict[str, object], allow_large: bool = False
) -> tuple[Any, Any, str]:
    hf = _transformers()
    what = f"Hugging Face folder {path}"
    errors: tuple[type[Exception], ...] = (OSError, KeyError, ValueError, TypeError)
    errors += _strict_errors()
    try:
        config = hf.AutoConfig.from_pretrained(path, local_files_only=True)
        _check_keys(type(config), list(overrides), what)
        for key, value in overrides.items():
            setattr(config, key, value)
        _checked_size(hf, config, what, allow_large)
        weights = any(path.glob("*.safetensors")) or any(path.glob("pytorch_model*.bin"))
        if weights and not overrides:
            model = hf.AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
            return model, _tokenizer(path), what
        model = hf.AutoModelForCausalLM.from_config(config)
    except errors as error:
        if isinstance(error, ConfigurationError):
            raise
        reason = " ".join(str(error).split())[:160] or type(error).__name__
        raise ConfigurationError(f"cannot load the model in {path}: {reason}") from None
    warn(f"{path}: no weights (or config overrides): random initialisation")
    return model, _tokenizer(path), f"{what} (random weights)"


def _tokenizer(path: Path) -> Any:
    """The folder's tokenizer, or None (byte-level fallback) when it has none: transformers 5.x
    returns an *empty-vocabulary* tokenizer for a folder without tokenizer files (config only,
    or ``save_pretrained`` of a model), which would encode any text to 0 tokens."""
    hf = _transformers()
    try:
        tokenizer = hf.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError):
        return None
    return None if _empty_vocabulary(tokenizer) else tokenizer


def _empty_vocabulary(tokenizer: Any) -> bool:
    """No entries besides the special tokens (``vocab_size`` 0, e.g. only ``<|endoftext|>``)."""
    if getattr(tokenizer, "vocab_size", None) == 0:
        return True
    try:
        vocab = tokenizer.get_vocab()
    except (AttributeError, NotImplementedError, TypeError):
        return False
    special = set(getattr(tokenizer, "all_special_tokens", ()) or ())
    return not any(token not in special for token in vocab)


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


def _load_run_folder(
    path: Path, overrides: dict[str, object], allow_large: bool = False
) -> tuple[Any, Any, str]:
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


def is_run_source(source: str) -> bool:
    """Whether SOURCE names a gradstats run folder (``checkpoint.pt``, no ``config.json``)."""
    path = Path(source)
    return bool(source) and _is_run_folder(path) and (path / "checkpoint.pt").is_file()


def run_corpus_text(source: str) -> str:
    """The training text of a gradstats run (its config's ``data``: the embedded corpus or a
    text file), checked against the SHA-256 the checkpoint recorded.

    Raises:
        StateError: the checkpoint records no usable corpus, or the corpus changed since.
    """
    from gradstats.data import load_corpus
    from gradstats.eqprop.train import load_checkpoint

    path = Path(source)
    state = load_checkpoint(path)
    config = state.get("config")
    data = config.get("data") if isinstance(config, dict) else None
    if data is not None and not isinstance(data, str):
        raise StateError(f"{path}: the checkpoint's config 'data' is not a path or corpus name")
    try:
        corpus = load_corpus(data)
    except (OSError, ValueError) as error:
        raise StateError(
            f"{path}: cannot read the run's corpus {data or 'shakespeare_char'!r} ({error}); "
            "pass --text FILE"
        ) from None
    recorded = state.get("corpus")
    sha = recorded.get("sha256") if isinstance(recorded, dict) else None
    if sha and sha != corpus.sha256:
        raise StateError(
            f"{path}: the run's corpus {data or 'shakespeare_char'!r} changed since training "
            "(SHA-256 differs); pass --text FILE"
        )
    return corpus.decode(corpus.train)


def _unknown_type(model_type: str) -> str:
    known = list(_transformers().CONFIG_MAPPING.keys())
    hint = suggest(model_type, known)
    examples = ", ".join(t for t in ("gpt2", "llama", "mistral", "qwen2") if t in known)
    return f"unknown model type {model_type!r}{hint}; {len(known)} known, e.g. {examples}"


def _from_config(
    config_dict: dict[str, Any], overrides: dict[str, object], what: str, allow_large: bool = False
) -> tuple[Any, Any, str]:
    hf = _transformers()
    model_type = config_dict.pop("model_type", None)
    if not isinstance(model_type, str):
        raise ConfigurationError(f"{what} has no 'model_type' (a string)")
    if model_type not in hf.CONFIG_MAPPING:
        raise ConfigurationError(f"{what}: {_unknown_type(model_type)}")
    _check_keys(hf.CONFIG_MAPPING[model_type], list(overrides), what)
    errors: tuple[type[Exception], ...] = (ValueError, TypeError, KeyError, AttributeError)
    errors += _strict_errors()
    try:
        config = hf.AutoConfig.for_model(model_type, **(config_dict | overrides))
        _checked_size(hf, config, what, allow_large)
        model = hf.AutoModelForCausalLM.from_config(config)
    except errors as error:
        if isinstance(error, ConfigurationError):
            raise
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


def load_source(
    source: str, overrides: dict[str, object], *, allow_large: bool = False
) -> tuple[Any, Any, str]:
    """(model, tokenizer or None, description) for SOURCE; see the module docstring.

    ``--set`` keys the config does not have are refused (with a "did you mean" and the valid
    keys); config sources state their parameter count before building and are refused above
    :data:`MAX_PARAMETERS` unless ``allow_large``."""
    if not source:
        raise ConfigurationError(
            "SOURCE is required: an HF model folder, a config JSON, a model type or a run folder"
        )
    path = Path(source)
    if path.is_dir():
        loader = _load_run_folder if _is_run_folder(path) else _hf_folder
        return loader(path, overrides, allow_large)
    if path.suffix == ".json":
        if not path.is_file():
            raise FileNotFoundError(f"no config file {path}")
        return _from_config(_config_file(path), overrides, f"config {path}", allow_large)
    if path.exists():
        raise ConfigurationError(
            f"{path} is a file, but not a config JSON (*.json): SOURCE is an HF model folder, "
            "a config JSON, a model type or a run folder"
        )
    if source not in _transformers().CONFIG_MAPPING:
        raise ConfigurationError(
            f"no such folder or model type: {source!r}; {_unknown_type(source)}"
        )
    what = f"model type {source!r} (random weights)"
    return _from_config({"model_type": source}, overrides, what, allow_large)


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
        ids = list(tokenizer(text)["input_ids"])
        if ids or not text:
            return ids
        warn("the tokenizer encodes the text to 0 tokens; using the byte-level fallback")
    data = text.encode("utf-8")
    return list(data) if vocab >= 256 else [b % vocab for b in data]
