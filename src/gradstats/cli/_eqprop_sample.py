"""``gradstats eqprop sample RUN``: text from a trained run (equilibrium model or baseline).

Loads the run's checkpoint, its saved configuration and its corpus vocabulary, encodes
``--prompt`` with that vocabulary and appends ``--tokens`` characters with
:func:`gradstats.eqprop.models.generate` (KV cache of the converged prefix: one relaxation of
one position per token). An equilibrium model relaxes with the run's free-phase settings
(``t1`` as the step cap, its ``tol`` and ``step_size``; a ``bptt`` run, which trains on exactly
``t1`` steps, is sampled at its fixed point with the model's tolerance and step cap).
``--temperature 0`` (or ``--top-k 1``) is greedy; otherwise the draws come from a generator
seeded with ``--seed``, so the same command prints the same text. The text goes to stdout;
``--out FILE`` also writes a JSON record (prompt, text, settings, checkpoint step), atomically.

Everything is checked before any compute: the checkpoint, the prompt's characters (one line
naming those not in the vocabulary), the options and ``--out``.
"""

from __future__ import annotations

import argparse
import json
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gradstats.cli._checks import check_out_dir
from gradstats.cli._config import add_config_arguments, config_from_args, option
from gradstats.errors import ConfigurationError, StateError

__all__ = ["SampleConfig", "register_sample", "run_sample"]


@dataclass(frozen=True)
class SampleConfig:
    path: Path = option(
        Path("."),
        "run folder (or its checkpoint.pt) of 'gradstats eqprop train'",
        positional=True,
        metavar="RUN",
    )
    prompt: str | None = option(
        None, "text to continue, every character in the run's vocabulary (default: a newline)"
    )
    tokens: int = option(200, "characters to generate")
    temperature: float = option(1.0, "softmax temperature (0: greedy)")
    top_k: int | None = option(None, "sample among the K most likely characters (default: all)")
    seed: int = option(0, "seed of the sampling generator")
    # not named `out`: the CLI's entry point checks every `out` as a folder, this is a file
    record: Path | None = option(
        None, "also write a JSON record to this file", flag="--out", metavar="FILE"
    )


def _load(path: Path) -> tuple[dict[str, Any], Any, Any, str]:
    """(checkpoint, the run's TrainConfig, the model, the vocabulary); nothing computed."""
    from gradstats.eqprop.models import BackpropTransformer, EquilibriumTransformer
    from gradstats.eqprop.train import TrainConfig, build_from_checkpoint, load_checkpoint

    state = load_checkpoint(path, require=("corpus.vocab",))
    try:
        run = TrainConfig.from_dict(state["config"])
    except (TypeError, ValueError) as error:
        raise StateError(f"{path}: the saved run configuration is invalid: {error}") from None
    vocab = state["corpus"]["vocab"]
    model = build_from_checkpoint(state)
    if not isinstance(model, (EquilibriumTransformer, BackpropTransformer)):
        raise StateError(f"{path} holds a {state['model_class']}: sample needs a language model")
    size = model.embed.token.shape[0]
    if not isinstance(vocab, str) or len(vocab) != size:
        what = f"{len(vocab)} characters" if isinstance(vocab, str) else type(vocab).__name__
        raise StateError(
            f"{path}: the checkpoint's vocabulary ({what}) does not fit its model's {size} tokens"
        )
    return state, run, model, vocab


def _check_out_file(out: Path) -> Path:
    """The file to write for ``--out``: ``out``, or the file a link ``out`` points to.

    Refused: a folder, a broken link or a link loop, anything but a regular file (``/dev/null``,
    a FIFO: the atomic rename would replace the device node itself), a read-only file, and a
    file in a folder this process cannot write in.
    """
    if out.is_dir():
        raise ConfigurationError(f"--out {out} is a folder; give a file name (e.g. sample.json)")
    if out.is_symlink():
        try:
            target = out.resolve(strict=True)
        except (OSError, RuntimeError):  # RuntimeError: a link loop (Python < 3.13)
            raise ConfigurationError(
                f"--out {out} is a broken symbolic link (or a loop of links)"
            ) from None
        if target.is_dir():
            raise ConfigurationError(f"--out {out} links to a folder; give a file name")
        out = target
    if out.exists():
        mode = out.stat().st_mode
        if not stat.S_ISREG(mode):
            raise ConfigurationError(
                f"--out {out} is not a regular file (a device, FIFO or socket); give a file name"
            )
        if not mode & 0o222:
            raise ConfigurationError(f"--out {out} is a read-only file")
    check_out_dir(out.parent, f"--out {out}: its folder")
    return out


def run_sample(config: SampleConfig) -> str:
    """Sample from the run ``config.path``, print the text, write ``--out``; return the text."""
    import torch

    from gradstats._files import write_text_atomic
    from gradstats.eqprop.models import EquilibriumTransformer, generate

    record = None if config.record is None else _check_out_file(config.record)
    if config.tokens < 0:
        raise ConfigurationError(f"--tokens must be >= 0; got {config.tokens}")
    if not config.temperature >= 0:  # NaN included
        raise ConfigurationError(f"--temperature must be >= 0; got {config.temperature}")
    if config.top_k is not None and config.top_k < 1:
        raise ConfigurationError(f"--top-k must be >= 1; got {config.top_k}")
    prompt = "\n" if config.prompt is None else config.prompt
    if not prompt:
        raise ConfigurationError("--prompt is empty: give at least one character")
    state, run, model, vocab = _load(config.path)
    unknown = "".join(dict.fromkeys(ch for ch in prompt if ch not in vocab))
    if unknown:
        raise ConfigurationError(
            f"--prompt holds characters not in the run's vocabulary: {unknown!r} "
            f"(the vocabulary has {len(vocab)} characters)"
        )
    index = {ch: i for i, ch in enumerate(vocab)}
    ids = torch.tensor([index[ch] for ch in prompt], dtype=torch.int64)
    settings: dict[str, Any] = {}
    if isinstance(model, EquilibriumTransformer):
        settings = {"step_size": run.step_size}
        if run.method != "bptt":
            settings.update(max_steps=run.t1, tol=run.tol)
    generator = torch.Generator().manual_seed(config.seed)
    out = generate(
        model,
        ids,
        config.tokens,
        temperature=config.temperature,
        top_k=config.top_k,
        generator=generator,
        **settings,
    )
    text = "".join(vocab[i] for i in out[len(prompt) :].tolist())
    print(prompt + text)
    if record is not None:
        data = {
            "checkpoint": {"path": str(config.path), "step": state["step"], "method": run.method},
            "model": model.config(),
            "prompt": prompt,
            "text": text,
            "tokens": config.tokens,
            "temperature": config.temperature,
            "top_k": config.top_k,
            "seed": config.seed,
            "solver": {k: v for k, v in settings.items() if v is not None},
        }
        write_text_atomic(record, json.dumps(data, indent=1) + "\n")
    return text


def _run(args: argparse.Namespace) -> int:
    run_sample(config_from_args(SampleConfig, args))
    return 0


def register_sample(sub: argparse._SubParsersAction) -> None:
    """Add ``sample`` to the ``eqprop`` subcommands ``sub``."""
    parser = sub.add_parser(
        "sample",
        help="generate text from a trained run (equilibrium model or backprop baseline)",
        description=(
            "Load RUN's checkpoint and vocabulary and continue --prompt by --tokens characters. "
            "Each character costs one relaxation of one position (keys and values of the "
            "converged prefix are cached). --temperature 0 or --top-k 1 is greedy; otherwise "
            "--seed makes the text reproducible."
        ),
    )
    add_config_arguments(parser, SampleConfig)
    parser.set_defaults(run=_run)
