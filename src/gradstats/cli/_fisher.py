"""``gradstats fisher SOURCE``: collect the diagonal Fisher of a causal LM on a text file.

SOURCE is one of

* a Hugging Face model folder (``config.json``; weights are loaded when the folder has them,
  otherwise the model is randomly initialised, with a warning; a tokenizer in the folder is used);
* a config JSON file with a ``model_type`` key, or a registered model type name (``gpt2``,
  ``llama``, ...) — built from the config, randomly initialised; ``--set KEY=VALUE`` overrides
  config entries (e.g. ``--set n_layer=2 n_embd=64``);
* a gradstats run folder (``checkpoint.pt`` written by ``gradstats eqprop train``): the model
  (equilibrium transformer or its backprop baseline) with its weights and the run's character
  vocabulary (characters outside it are dropped, with a warning). The equilibrium transformer
  is differentiated at its fixed point by the implicit function theorem, one sequence at a time
  (exact, slow).

Without a tokenizer the text is mapped byte by byte: token id = UTF-8 byte value when the
vocabulary has at least 256 entries, else byte value mod vocabulary size (documented fallback).
The text is cut into sequences of ``--seq-len`` tokens, ``--batch-size`` per batch.

Writes ``fisher.safetensors`` (see ``FisherCollector.save``), ``summary.json`` and
``heads_heatmap.png`` (layers × heads) into ``--out``, and prints the top groups.

Under ``torchrun`` (``WORLD_SIZE`` > 1) the process group is initialised from the environment
(gloo on the CPU, NCCL with ``--device cuda``, one GPU per ``LOCAL_RANK``); every rank builds
the same model and batches, collects the batches b with b mod W = rank, the statistics are
all-reduced (float64 sums, Chan-merged moments) and rank 0 writes the outputs — the same numbers
as one process on all the batches (``--kind mc`` draws labels with seed + rank).
"""

from __future__ import annotations

import argparse
import json
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from gradstats._format import format_table
from gradstats.cli._config import add_config_arguments, config_from_args, option

__all__ = ["FisherConfig", "register", "run_fisher"]


@dataclass(frozen=True)
class FisherConfig:
    source: str = option(
        "", "HF model folder, config JSON, model type name, or a run folder", positional=True
    )
    text: Path | None = option(None, "UTF-8 text file to collect on (required)")
    out: Path = option(Path("gradstats-fisher"), "output folder")
    kind: str = option("empirical", "estimand", choices=("empirical", "mc", "exact"))
    unit: str = option("sample", "unit of the statistics", choices=("sample", "token"))
    mc_samples: int = option(1, "labels drawn per sequence for --kind mc")
    seq_len: int = option(64, "tokens per sequence")
    batch_size: int = option(4, "sequences per batch")
    max_batches: int = option(16, "stop after this many batches")
    seed: int = option(0, "seed of the sampled labels and of a random initialisation")
    dtype: str = option("float32", "model dtype", choices=("float32", "float64", "bfloat16"))
    set: tuple[str, ...] = option(
        (), "config overrides KEY=VALUE (config sources)", nargs="*", metavar="KEY=VALUE"
    )
    top: int = option(15, "rows of the top-groups table")
    rank_by: str = option(
        "mask", "group quantity of the table and heatmap", choices=("trace", "mask")
    )
    progress: bool = option(True, "show a progress bar")
    device: str = option("cpu", "device of the model", choices=("cpu", "cuda"))


def _overrides(pairs: tuple[str, ...]) -> dict[str, object]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects KEY=VALUE; got {pair!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _hf_folder(path: Path, overrides):
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True, **overrides)
        weights = any(path.glob("*.safetensors")) or any(path.glob("pytorch_model*.bin"))
        if weights and not overrides:
            model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
            return model, _tokenizer(path), f"Hugging Face folder {path}"
    except (OSError, KeyError) as error:
        raise ValueError(
            f"cannot load the model in {path}: {str(error).splitlines()[0][:120]}"
        ) from None
    warnings.warn(f"{path}: no weights (or config overrides): random initialisation", stacklevel=2)
    model = AutoModelForCausalLM.from_config(config)
    return model, _tokenizer(path), f"Hugging Face folder {path} (random weights)"


def _tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
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
            warnings.warn(f"{dropped} characters are not in the run's vocabulary", stacklevel=2)
        return {"input_ids": ids}


def _load_run_folder(path: Path, overrides):
    if not (path / "checkpoint.pt").is_file():
        raise ValueError(
            f"{path} is neither a Hugging Face model folder (config.json) nor a gradstats run "
            "folder (checkpoint.pt)"
        )
    if overrides:
        raise ValueError("--set applies to config sources, not to a gradstats run folder")
    try:
        from gradstats.eqprop.train import build_from_checkpoint, load_checkpoint
    except ImportError:
        raise ValueError(
            f"{path} is a gradstats run folder, but this gradstats has no equilibrium-"
            "transformer checkpoint loader (gradstats.eqprop.train)"
        ) from None
    state = load_checkpoint(path)
    model = build_from_checkpoint(state)
    vocab = (state.get("corpus") or {}).get("vocab")
    tokenizer = _CharTokenizer(vocab) if vocab else None
    what = f"gradstats run {path} ({state['model_class']}, step {state['step']})"
    return model, tokenizer, what


def _from_config(config_dict: dict, overrides, what: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type = config_dict.pop("model_type", None)
    if not isinstance(model_type, str):
        raise ValueError(f"{what} has no 'model_type'")
    try:
        config = AutoConfig.for_model(model_type, **(config_dict | overrides))
    except ValueError as error:
        raise ValueError(
            f"unknown model type {model_type!r} ({str(error).splitlines()[0][:80]})"
        ) from None
    return AutoModelForCausalLM.from_config(config), None, what


def load_source(source: str, overrides: dict[str, object]):
    """(model, tokenizer or None, description) for SOURCE; see the module docstring."""
    path = Path(source)
    if path.is_dir():
        loader = _load_run_folder if _is_run_folder(path) else _hf_folder
        return loader(path, overrides)
    if path.suffix == ".json":
        if not path.is_file():
            raise FileNotFoundError(f"no config file {path}")
        return _from_config(json.loads(path.read_text()), overrides, f"config {path}")
    if not source:
        raise ValueError("SOURCE is required: an HF model folder, a config JSON or a model type")
    return _from_config(
        {"model_type": source}, overrides, f"model type {source!r} (random weights)"
    )


def _vocab_size(model) -> int:
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if output is not None:
        return output.weight.shape[0]
    if isinstance(getattr(model, "vocab_size", None), int):
        return model.vocab_size
    raise ValueError(f"cannot tell the vocabulary size of {type(model).__name__}")


def encode(text: str, tokenizer, vocab_size: int) -> list[int]:
    """Token ids of ``text``: the tokenizer's, or UTF-8 bytes (mod ``vocab_size`` if < 256)."""
    if tokenizer is not None:
        return list(tokenizer(text)["input_ids"])
    data = text.encode("utf-8")
    return list(data) if vocab_size >= 256 else [b % vocab_size for b in data]


def _batches(ids: list[int], config: FisherConfig):
    n = len(ids) // config.seq_len
    if n == 0:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than --seq-len {config.seq_len}")
    rows = torch.tensor(ids[: n * config.seq_len]).view(n, config.seq_len)
    for start in range(0, n, config.batch_size):
        yield rows[start : start + config.batch_size]


def _heatmap(values: dict[str, torch.Tensor], families, path: Path, title: str) -> bool:
    rows = sorted((f.layer, f.name) for f in families if f.kind == "heads" and f.name in values)
    if not rows:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = torch.stack([values[name].double().cpu() for _, name in rows]).numpy()
    fig, ax = plt.subplots(
        figsize=(max(4, 0.35 * grid.shape[1] + 2), max(3, 0.3 * grid.shape[0] + 1.5))
    )
    image = ax.imshow(grid, aspect="auto", cmap="viridis")
    ax.set(xlabel="head", ylabel="layer", title=title)
    ax.set_yticks(range(len(rows)), [str(layer) for layer, _ in rows])
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _device(name: str) -> torch.device:
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def run_fisher(config: FisherConfig) -> Path:
    """Collect, save, print the table and draw the heatmap; returns the output folder.

    Under a ``torch.distributed`` process group (or ``torchrun``) only rank 0 writes and prints.
    """
    from gradstats._torchrun import torchrun_process_group

    _check_config(config)
    with torchrun_process_group(config.device) as (rank, world):
        return _run(config, rank, world)


def _check_config(config: FisherConfig) -> None:
    for name in ("mc_samples", "seq_len", "batch_size", "max_batches", "top"):
        if getattr(config, name) < 1:
            raise ValueError(
                f"--{name.replace('_', '-')} must be >= 1; got {getattr(config, name)}"
            )
    if config.seq_len < 2:
        raise ValueError("--seq-len must be >= 2 (one next-token target)")
    if config.text is None:
        raise ValueError("--text FILE is required")
    if not config.text.is_file():
        raise FileNotFoundError(f"no text file {config.text}")
    if config.kind != "mc" and config.mc_samples != 1:
        raise ValueError("--mc-samples applies to --kind mc only")


def _run(config: FisherConfig, rank: int, world: int) -> Path:
    from gradstats.fisher import FisherCollector, importance_ranking

    device = _device(config.device)
    torch.manual_seed(config.seed)  # the same random initialisation on every rank
    model, tokenizer, description = load_source(config.source, _overrides(config.set))
    model = model.to(device=device, dtype=getattr(torch, config.dtype)).eval()
    vocab = _vocab_size(model)
    ids = encode(config.text.read_text(encoding="utf-8"), tokenizer, vocab)
    fc = FisherCollector(
        model,
        config.kind,
        "causal_lm",
        config.unit,
        mc_samples=config.mc_samples,
        seed=config.seed + rank,
        max_exact_passes=10**9,
    )
    fc.collect_loader(
        _batches(ids, config),
        max_batches=config.max_batches,
        progress=config.progress and rank == 0,
        device=device,
        distributed=True,
    )
    if rank != 0:
        return config.out
    out = config.out
    out.mkdir(parents=True, exist_ok=True)
    fc.save(out / "fisher.safetensors")
    per_unit = [
        f.name for f in fc.families if f.per_unit and f.kind in ("heads", "neurons", "channel")
    ]
    ranking = (
        importance_ranking(fc, config.rank_by, families=per_unit)[: config.top] if per_unit else []
    )
    values = fc.group_fisher(config.rank_by)
    drew = _heatmap(
        values,
        fc.families,
        out / "heads_heatmap.png",
        f"{config.rank_by} Fisher per head ({config.kind})",
    )
    summary = {
        "source": description,
        "tokenizer": "model tokenizer" if tokenizer is not None else "byte-level fallback",
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
        "counts": fc.counts,
        "world_size": world,
        "handlers": fc.handlers,
        "top_groups": ranking,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"{description}: {fc.counts['samples']} sequences, {fc.counts['tokens']} targets")
    if ranking:
        print(format_table([[n, v] for n, v in ranking], ["group", f"{config.rank_by} Fisher"]))
    print(
        f"\nwrote {out / 'fisher.safetensors'}"
        + (f" and {out / 'heads_heatmap.png'}" if drew else "")
    )
    return out


def run(args: argparse.Namespace) -> int:
    run_fisher(config_from_args(FisherConfig, args))
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "fisher",
        help="collect the diagonal Fisher of a causal LM on a text file; table + heatmap",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_arguments(parser, FisherConfig)
    parser.set_defaults(run=run)
