"""``gradstats noise SOURCE``: the gradient noise scale B_noise of a causal LM on a text file.

B_noise = tr Σ / ‖G‖² is the simple gradient noise scale of McCandlish et al. (2018), "An
Empirical Model of Large-Batch Training": tr Σ is the trace of the covariance of the
per-sequence gradient and ‖G‖² the squared norm of the true (expected) gradient, both at the
model's current weights. It is the batch size at which the noise of a mini-batch gradient
(tr Σ / B) equals its signal (‖G‖²), and approximates the critical batch size: below it,
doubling the batch nearly halves the steps to a given loss; above it, mostly compute is
spent. The suggested batch size is B_noise rounded (in sequences of --seq-len tokens).

SOURCE is handled as by ``gradstats fisher``: a Hugging Face model folder, a config JSON file
with a ``model_type`` key, a registered model type name (``gpt2``, ``llama``, ...; ``--set
KEY=VALUE`` overrides config entries, a key the config lacks is refused), or a gradstats run
folder (``gradstats eqprop train`` output; without ``--text`` its own training corpus is used).
The text is tokenised as there and cut into sequences of --seq-len tokens, --batch-size per
batch; the first --batches full batches are used (fewer if the text has fewer).

Each batch runs one forward and backward of the mean next-token cross-entropy per sequence at
fixed weights (no optimizer step), with ``VarianceGradientScaler(statistic="per_sample")``
giving per tensor the unbiased tr Σ and ‖G‖² of the batch from its per-sequence gradient norms.
These are averaged exactly over the batches (no EMA) per layer (transformer block or module)
and over all tensors; B_noise = mean tr Σ / mean ‖G‖², its standard error over the batches by
the delta method (see gradstats.cli._noise_stats). A layer whose ‖G‖² estimate is <= 0 has
no detectable signal (B_noise "-").

Writes ``noise.json`` and ``noise.png`` (per-layer B_noise with SE bars) into --out and prints
the table. Under ``torchrun`` (WORLD_SIZE > 1) every rank builds the same model and batches,
measures the batches b with b mod W = rank, the per-batch estimates are all-reduced and rank 0
writes the outputs: the same numbers as one process on all the batches.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from gradstats._files import write_text_atomic
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
from gradstats.cli._noise_stats import plot_layers, summarise
from gradstats.errors import ConfigurationError, StateError

__all__ = ["FORMAT_VERSION", "NoiseConfig", "register", "run_noise", "sequence_losses"]

FORMAT_VERSION = 1


@dataclass(frozen=True)
class NoiseConfig:
    source: str = option(
        "", "HF model folder, config JSON, model type name, or a run folder", positional=True
    )
    text: Path | None = option(
        None, "UTF-8 text file to measure on (required, except for a run folder: its corpus)"
    )
    out: Path = option(Path("gradstats-noise"), "output folder")
    seq_len: int = option(64, "tokens per sequence")
    batch_size: int = option(8, "sequences per batch (>= 2)")
    batches: int = option(16, "batches to average over (the SE needs >= 2)")
    seed: int = option(0, "seed of a random initialisation")
    dtype: str = option("float32", "model dtype", choices=("float32", "float64", "bfloat16"))
    set: tuple[str, ...] = option(
        (), "config overrides KEY=VALUE (config sources)", nargs="*", metavar="KEY=VALUE"
    )
    progress: bool = option(True, "show a progress bar")
    device: str = option("cpu", "device of the model (cpu, cuda, cuda:1, ...)")
    allow_large: bool = option(
        False, f"build models above {MAX_PARAMETERS // 10**6}M parameters (refused otherwise)"
    )


def sequence_losses(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """[B] mean next-token cross-entropy of each sequence (targets ``ids[:, 1:]``)."""
    flat = logits[:, :-1].reshape(-1, logits.shape[-1])
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.float()  # bfloat16 logits: the loss in float32
    losses = F.cross_entropy(flat, ids[:, 1:].reshape(-1), reduction="none")
    return losses.view(ids.shape[0], -1).mean(1)


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids)
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if not isinstance(logits, torch.Tensor):
        raise ConfigurationError(f"{type(model).__name__} returned no logits tensor")
    return logits


def run_noise(config: NoiseConfig) -> Path:
    """Measure, print the table, write ``noise.json`` and ``noise.png``; returns --out.

    Every option, ``--out`` and ``--device`` are checked before the process group is joined and
    the model is built; under ``torchrun`` only rank 0 writes and prints.
    """
    from gradstats._torchrun import torchrun_process_group

    text = _check_config(config)
    with torchrun_process_group(config.device) as (rank, world):
        return _run(config, text, rank, world)


def _check_config(config: NoiseConfig) -> str | None:
    for name in ("seq_len", "batch_size", "batches"):
        if getattr(config, name) < 1:
            raise ConfigurationError(
                f"--{name.replace('_', '-')} must be >= 1; got {getattr(config, name)}"
            )
    if config.seq_len < 2:
        raise ConfigurationError("--seq-len must be >= 2 (one next-token target)")
    if config.batch_size < 2:
        raise ConfigurationError(
            "--batch-size must be >= 2: tr Σ is estimated from the spread of the sequences "
            "of one batch"
        )
    overrides(config.set)
    rank_device(config.device)
    check_out_dir(config.out)
    return read_text(config.text, config.source)


def _note(message: str) -> None:
    sys.stderr.write(f"gradstats noise: note: {' '.join(message.split())}\n")


def _measure(
    model: torch.nn.Module, batches: list[torch.Tensor], rank: int, world: int, progress: bool
) -> tuple[torch.Tensor, list[str]]:
    """[N, J, 2] float64 (tr Σ, ‖G‖²) of every batch and tensor (this rank's batches filled)."""
    from tqdm.auto import tqdm

    from gradstats import VarianceGradientScaler

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names = [n for n, _ in named]
    numel = torch.tensor([p.numel() for _, p in named], dtype=torch.float64)
    device = named[0][1].device
    per_batch = torch.zeros(len(batches), len(names), 2, dtype=torch.float64)
    size = batches[0].shape[0]
    vgs = VarianceGradientScaler(
        named, statistic="per_sample", model=model, unit="sample", batch_size=size,
        distributed=False,
    )  # fmt: skip
    mine = range(rank, len(batches), world)
    for b in tqdm(mine, desc="noise", disable=not progress, leave=False):
        model.zero_grad(set_to_none=True)
        ids = batches[b].to(device)
        sequence_losses(_logits(model, ids), ids).mean().backward()
        vgs.step()
        stats = vgs.statistics()
        if stats["global"].count < 1:
            raise StateError(
                f"batch {b + 1}: non-finite gradients (the loss overflowed); try --dtype "
                "float32 or float64"
            )
        rows = [stats[n] for n in names]
        seen = torch.tensor([r.count >= 1 for r in rows])  # a tensor without a gradient: 0
        noise = torch.tensor([r.variance_unbiased for r in rows], dtype=torch.float64)
        signal = torch.tensor([r.signal_unbiased for r in rows], dtype=torch.float64)
        # rows are per coordinate: tr Cov(ĝ) / numel = tr Σ / (B numel), ‖G‖² / numel
        per_batch[b, :, 0] = torch.where(seen, noise * numel * size, 0.0)
        per_batch[b, :, 1] = torch.where(seen, signal * numel, 0.0)
        vgs.reset_statistics()  # the next batch's estimate alone (exact means, no EMA)
    vgs.remove_hooks()
    model.zero_grad(set_to_none=True)
    if world > 1:
        import torch.distributed as dist

        reduced = per_batch.to(device)
        dist.all_reduce(reduced)  # each batch's row is filled on one rank only
        per_batch = reduced.cpu()
    return per_batch, names


def _run(config: NoiseConfig, text: str | None, rank: int, world: int) -> Path:
    device = rank_device(config.device)
    torch.manual_seed(config.seed)  # the same random initialisation on every rank
    model, tokenizer, description = load_source(
        config.source, overrides(config.set), allow_large=config.allow_large
    )
    if text is None:  # a run folder without --text: the run's own training corpus
        text = run_corpus_text(config.source)
    model = model.to(device=device, dtype=getattr(torch, config.dtype)).eval()
    rows = token_rows(encode(text, tokenizer, vocab_size(model)), config.seq_len, model)
    available = rows.shape[0] // config.batch_size
    if available == 0:
        raise ConfigurationError(
            f"the text has {rows.shape[0]} sequences of --seq-len {config.seq_len}, fewer than "
            f"--batch-size {config.batch_size}"
        )
    count = min(config.batches, available)
    if count < config.batches and rank == 0:
        _note(f"the text has {available} full batches; using {count}, not --batches")
    batches = [rows[b * config.batch_size : (b + 1) * config.batch_size] for b in range(count)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        per_batch, names = _measure(model, batches, rank, world, config.progress and rank == 0)
    if rank != 0:
        return config.out
    for message in dict.fromkeys(str(w.message) for w in caught):
        _note(message)
    summary = summarise(per_batch, names)
    name = getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__
    result = {
        "format_version": FORMAT_VERSION,
        "source": description,
        "model": name,
        "tokenizer": "model tokenizer" if tokenizer is not None else "byte-level fallback",
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
        "world_size": world,
        "batches": count,
        "batch_size": config.batch_size,
        "sequences": count * config.batch_size,
        "unit": "sequence (mean next-token cross-entropy per sequence)",
        **summary,
        "per_batch": {
            "trace_sigma": per_batch[:, :, 0].sum(1).tolist(),
            "grad_sq_norm": per_batch[:, :, 1].sum(1).tolist(),
        },
    }
    out = config.out
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "noise.json", json.dumps(result, indent=1))
    title = f"{name}: gradient noise scale per layer ({count}×{config.batch_size} sequences)"
    plot_layers(summary, out / "noise.png", title)
    print(f"{description}: {count} batches of {config.batch_size} sequences × {config.seq_len}")
    print(_table(summary))
    print(f"\nwrote {out / 'noise.json'} and {out / 'noise.png'}")
    return out


def _table(summary: dict[str, Any]) -> str:
    rows = []
    for layer, r in [("global", summary["global"]), *summary["layers"].items()]:
        rows.append(
            [layer, r["B_noise"], r["B_noise_se"], r["trace_sigma"], r["grad_sq_norm"],
             r["suggested_batch_size"]]
        )  # fmt: skip
    headers = ["layer", "B_noise", "± SE", "tr Σ", "‖G‖²", "suggested batch"]
    return format_table(rows, headers)


def run(args: argparse.Namespace) -> int:
    run_noise(config_from_args(NoiseConfig, args))
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "noise",
        help="gradient noise scale B_noise (critical batch size) of a causal LM on a text file",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_arguments(parser, NoiseConfig)
    parser.set_defaults(run=run)
