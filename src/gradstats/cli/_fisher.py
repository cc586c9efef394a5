"""``gradstats fisher SOURCE``: collect the diagonal Fisher of a causal LM on a text file.

SOURCE is one of

* a Hugging Face model folder (``config.json``; weights are loaded when the folder has them,
  otherwise the model is randomly initialised, with a warning; a tokenizer in the folder is used);
* a config JSON file with a ``model_type`` key, or a registered model type name (``gpt2``,
  ``llama``, ...) — built from the config, randomly initialised; ``--set KEY=VALUE`` overrides
  config entries (e.g. ``--set n_layer=2 n_embd=64`` for gpt2; a key the config does not have
  is refused, listing the valid ones). The parameter count is printed before building, and a
  model above 400M parameters is refused unless ``--allow-large``;
* a gradstats run folder (``checkpoint.pt`` written by ``gradstats eqprop train``): the model
  (equilibrium transformer or its backprop baseline) with its weights and the run's character
  vocabulary (characters outside it are dropped, with a warning). The equilibrium transformer
  is differentiated at its fixed point by the implicit function theorem, one sequence at a time
  (exact, slow). Without ``--text`` the run's own training corpus is used (its config's
  ``data``, checked against the SHA-256 in the checkpoint).

``--kind exact`` keeps the library's cap on label enumerations (``max_exact_passes``): through a
whole language model it needs V^T backward passes per sequence and is refused with one line
(use ``--kind mc``). Library warnings of the collection are printed as one ``note:`` line each.

Without a tokenizer (or with the empty-vocabulary tokenizer that transformers 5.x returns
for a folder without tokenizer files) the text is mapped byte by byte: token id = UTF-8 byte
value when the vocabulary has at least 256 entries, else byte value mod vocabulary size.
The text is cut into sequences of ``--seq-len`` tokens (at most the model's positions),
``--batch-size`` per batch.

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
import sys
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from gradstats._files import atomic_path, write_text_atomic
from gradstats._format import format_table
from gradstats.cli._checks import check_out_dir
from gradstats.cli._config import add_config_arguments, config_from_args, option
from gradstats.cli._fisher_source import (
    MAX_PARAMETERS,
    encode,
    load_source,
    overrides,
    run_corpus_text,
    vocab_size,
)
from gradstats.cli._lm_text import rank_device, read_text, token_rows
from gradstats.errors import ConfigurationError

__all__ = ["FisherConfig", "register", "run_fisher"]

LABELS = {"mask": "mask Fisher E[(Σ θ·g)²] of the head", "trace": "trace Fisher Σ F_jj of the head"}


@dataclass(frozen=True)
class FisherConfig:
    source: str = option(
        "", "HF model folder, config JSON, model type name, or a run folder", positional=True
    )
    text: Path | None = option(
        None, "UTF-8 text file to collect on (required, except for a run folder: its corpus)"
    )
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
    device: str = option("cpu", "device of the model (cpu, cuda, cuda:1, ...)")
    allow_large: bool = option(
        False, f"build models above {MAX_PARAMETERS // 10**6}M parameters (refused otherwise)"
    )


def _rows(ids: list[int], config: FisherConfig, model: torch.nn.Module) -> torch.Tensor:
    """The text as [n, seq_len] token rows; checks it fills one and fits the model."""
    return token_rows(ids, config.seq_len, model)


def _batches(rows: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    for start in range(0, rows.shape[0], batch_size):
        yield rows[start : start + batch_size]


def _heatmap(values: dict[str, torch.Tensor], families, path: Path, title: str, label: str) -> bool:
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
    fig.colorbar(image, ax=ax, label=label)
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=120, format="png")
    finally:
        plt.close(fig)
    return True


def _device(name: str) -> torch.device:
    """The checked ``--device``; a bare ``cuda`` is ``cuda:LOCAL_RANK`` (one GPU per rank)."""
    return rank_device(name)


def run_fisher(config: FisherConfig) -> Path:
    """Collect, save, print the table and draw the heatmap; returns the output folder.

    Every option, ``--out`` and ``--device`` are checked before the process group is joined and
    the model is built. Under a ``torch.distributed`` process group (or ``torchrun``) only rank
    0 writes and prints; every file is written atomically.
    """
    from gradstats._torchrun import torchrun_process_group

    text = _check_config(config)
    with torchrun_process_group(config.device) as (rank, world):
        return _run(config, text, rank, world)


def _check_config(config: FisherConfig) -> str | None:
    """Check every option before any compute; return the text (None: a run folder's corpus,
    read once the run is loaded)."""
    for name in ("mc_samples", "seq_len", "batch_size", "max_batches", "top"):
        if getattr(config, name) < 1:
            raise ConfigurationError(
                f"--{name.replace('_', '-')} must be >= 1; got {getattr(config, name)}"
            )
    if config.seq_len < 2:
        raise ConfigurationError("--seq-len must be >= 2 (one next-token target)")
    if config.kind != "mc" and config.mc_samples != 1:
        raise ConfigurationError("--mc-samples applies to --kind mc only")
    overrides(config.set)
    _device(config.device)
    check_out_dir(config.out)
    return read_text(config.text, config.source)


def _notes(caught: list[warnings.WarningMessage], model: torch.nn.Module, rank: int) -> None:
    """The library's warnings of the collection as one plain line each (no source lines)."""
    if rank != 0:
        return
    seen: list[str] = []
    for item in caught:
        message = " ".join(str(item.message).split())
        if "torch.func" in message and type(model).__name__ == "EquilibriumTransformer":
            message = (
                "EquilibriumTransformer: per-sequence gradients by the implicit function "
                "theorem at the fixed point, one sequence at a time (exact, slow)"
            )
        if message not in seen:
            seen.append(message)
            sys.stderr.write(f"gradstats fisher: note: {message}\n")


def _run(config: FisherConfig, text: str | None, rank: int, world: int) -> Path:
    from gradstats.fisher import FisherCollector, importance_ranking

    device = _device(config.device)
    torch.manual_seed(config.seed)  # the same random initialisation on every rank
    model, tokenizer, description = load_source(
        config.source, overrides(config.set), allow_large=config.allow_large
    )
    if text is None:  # a run folder without --text: the run's own training corpus
        text = run_corpus_text(config.source)
    model = model.to(device=device, dtype=getattr(torch, config.dtype)).eval()
    rows = _rows(encode(text, tokenizer, vocab_size(model)), config, model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # max_exact_passes keeps the library's cap: an exact label enumeration through a
        # language model needs V^T passes per sequence, refused there with a one-line error
        fc = FisherCollector(
            model,
            config.kind,
            "causal_lm",
            config.unit,
            mc_samples=config.mc_samples,
            seed=config.seed + rank,
        )
        fc.collect_loader(
            _batches(rows, config.batch_size),
            max_batches=config.max_batches,
            progress=config.progress and rank == 0,
            device=device,
            distributed=True,
        )
    _notes(caught, model, rank)
    if rank != 0:
        return config.out
    out = config.out
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "fisher.safetensors") as tmp:
        fc.save(tmp)
    per_unit = [
        f.name for f in fc.families if f.per_unit and f.kind in ("heads", "neurons", "channel")
    ]
    ranking = (
        importance_ranking(fc, config.rank_by, families=per_unit)[: config.top] if per_unit else []
    )
    values = fc.group_fisher(config.rank_by)
    name = getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__
    drew = _heatmap(
        values,
        fc.families,
        out / "heads_heatmap.png",
        f"{name}: {config.rank_by} Fisher per head ({config.kind}, {fc.counts['samples']} seq.)",
        LABELS[config.rank_by],
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
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=1))
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
