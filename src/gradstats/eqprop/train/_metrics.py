"""Training metrics: one JSON object per line (``metrics.jsonl``) and the curves (``curves.png``).

Every step writes ``step``, ``train_ce`` (mean cross-entropy per token of the batch), ``lr``,
``grad_norm``, the residuals and steps of each phase (``res_free``, ``steps_free``,
``res_adjoint``, ``steps_adjoint``), ``unconverged`` (phases of this step that stopped at their
cap or stalled), ``skipped`` and the stabiliser penalties (``penalty.<name>``: value and scale);
evaluation steps add ``val_ce``, spot-check steps ``cos_implicit`` (all parameters) and
``cos_implicit_min`` with the group that attains it (``cos_implicit_group``) and the residual
of that reference's adjoint solve (``implicit_res_adjoint``), both at the weights the step's
estimate used. Equilibrium steps add ``contraction`` (the free phase's observed rate
q = (r_T/r_0)^(1/T), see ``_controller``); with ``contraction_target`` also ``jac_penalty`` and
``res_penalty`` (the weights the step used) and ``contraction_smoothed`` (the controller's q̄);
with ``ema_decay``, ``val_ce`` is the EMA weights' and ``val_ce_raw`` the trained weights'.
``time`` is the wall time since the start.

Rewrites (:meth:`MetricsLog.truncate`, at every resume) and the figure are written atomically (a
temporary file, flushed to disk, renamed over the target; removed when the write fails), so a
kill or a full disk during a rewrite leaves the previous file and no temporary one. An append
cut short (a kill or a full disk mid-line) leaves a truncated last line: :func:`read_metrics`
drops it with a warning, and the resume's rewrite removes it.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from gradstats._warnings import warn
from gradstats.errors import StateError

__all__ = ["MetricsLog", "curves_figure", "plot_curves", "read_metrics"]


@contextmanager
def _replacing(path: Path) -> Iterator[Path]:
    """A temporary path next to ``path``, renamed over it on success, removed on failure."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class MetricsLog:
    """Append-only JSONL log; :meth:`truncate` drops records after a checkpoint's step."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def truncate(self, step: int) -> None:
        """Keep only records with ``step <= step`` (a resumed run rewrites what came after)."""
        if not self.path.exists():
            return
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
        with _replacing(self.path) as tmp, tmp.open("w") as handle:
            handle.write("".join(json.dumps(r) + "\n" for r in kept))
            handle.flush()
            os.fsync(handle.fileno())  # the data on disk before the rename makes it visible

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file.

    A last line without its newline that is not a JSON object is what an interrupted append
    (a kill, a full disk) leaves: it is dropped with a warning, and the next rewrite
    (:meth:`MetricsLog.truncate` at a resume) removes it from the file.

    Raises:
        StateError: a complete line is not a JSON object (the message names the file and the
            line).
    """
    text = Path(path).read_text()
    lines = text.splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict):
            if number == len(lines) and not text.endswith("\n"):
                warn(
                    f"{path}, line {number}: dropped a truncated last record (an interrupted "
                    f"write): {line[:40]!r}",
                    UserWarning,
                )
                break
            raise StateError(f"{path}, line {number}: not a metrics record (a JSON object)")
        records.append(record)
    return records


def _smooth(values: list[float], span: int = 20) -> list[float]:
    out, acc, weight = [], 0.0, 0.0
    decay = 1 - 1 / span
    for v in values:
        acc = decay * acc + v
        weight = decay * weight + 1
        out.append(acc / weight)
    return out


def _cosine_note(spot_check_every: int | None) -> str:
    """The cosine panel's note when no run has a cosine point yet."""
    if spot_check_every == 0:
        return "no cosine: spot checks are off\n(spot_check_every=0)"
    every = "spot_check_every" if spot_check_every is None else str(spot_check_every)
    return f"no probe yet: the cosine vs the implicit\ngradient is measured every {every} steps"


def curves_figure(
    runs: dict[str, list[dict[str, Any]]], title: str = "", spot_check_every: int | None = None
) -> Any:
    """The ``curves.png`` figure (a matplotlib ``Figure``; the caller closes it): smoothed train
    and val CE, free / nudged-adjoint residuals and 1 − min-group cos vs the implicit gradient
    of one or more runs (``{label: records}``), one colour per run. Steps get integer ticks,
    log axes labels at decades; a cosine panel without points says why
    (``spot_check_every``: the runs' spot-check interval, for that note)."""
    from gradstats.eqprop._plotting import integer_x, legend, log_y, note, pyplot, thin_overlaps

    fig, axes = pyplot().subplots(1, 3, figsize=(15, 4))
    steps_seen: list[float] = []
    residuals: list[float] = []
    cosines: list[float] = []
    for index, (label, records) in enumerate(runs.items()):
        color = f"C{index % 10}"  # one colour per run in every panel
        steps = [r for r in records if r.get("train_ce") is not None and not r.get("skipped")]
        steps_seen += [r["step"] for r in records if "step" in r]
        if steps:
            xs = [r["step"] for r in steps]
            train_ce = _smooth([r["train_ce"] for r in steps])
            axes[0].plot(xs, train_ce, alpha=0.5, color=color, label=f"{label} train")
            val = [r for r in records if r.get("val_ce") is not None]
            axes[0].plot(
                [r["step"] for r in val],
                [r["val_ce"] for r in val],
                "o-",
                color=color,
                label=f"{label} val",
            )
        for key, style in (("res_free", "-"), ("res_adjoint", "--")):
            pts = [(r["step"], r[key]) for r in records if r.get(key) not in (None, 0.0)]
            pts = [(s, v) for s, v in pts if v == v and v > 0 and not math.isinf(v)]
            if pts:
                axes[1].plot(*zip(*pts, strict=True), style, color=color, label=f"{label} {key}")
                residuals += [v for _, v in pts]
        cos = [(r["step"], 1 - r["cos_implicit_min"]) for r in records if "cos_implicit_min" in r]
        if cos:
            ys = [max(v, 1e-12) for _, v in cos]
            axes[2].plot([s for s, _ in cos], ys, "o-", color=color, label=label)
            cosines += ys
    axes[0].set(xlabel="step", ylabel="cross-entropy (nats/char)", title=title or "loss")
    axes[1].set(xlabel="step", ylabel="final residual", title="free / nudged-adjoint residual")
    axes[2].set(xlabel="step", ylabel="1 - min-group cos", title="cos vs implicit gradient")
    for ax in axes:
        integer_x(ax, steps_seen, log=False)
        if steps_seen:  # one step range in every panel
            pad = max(0.5, 0.03 * (max(steps_seen) - min(steps_seen)))
            ax.set_xlim(min(steps_seen) - pad, max(steps_seen) + pad)
        legend(ax)
    log_y(axes[1], residuals)
    if not residuals:
        note(axes[1], "no residuals (backprop has no relaxation)")
    if cosines:
        log_y(axes[2], cosines)
    else:
        note(axes[2], _cosine_note(spot_check_every))
    fig.tight_layout()
    thin_overlaps(fig)
    return fig


def plot_curves(
    runs: dict[str, list[dict[str, Any]]],
    path: str | Path,
    title: str = "",
    spot_check_every: int | None = None,
) -> Path:
    """Write :func:`curves_figure` of ``runs`` (``{label: records}``) to ``path`` atomically."""
    from gradstats.eqprop._plotting import pyplot

    fig = curves_figure(runs, title, spot_check_every)
    try:
        with _replacing(Path(path)) as tmp:
            fig.savefig(tmp, dpi=100, format=Path(path).suffix.lstrip(".") or "png")
    finally:
        pyplot().close(fig)
    return Path(path)
