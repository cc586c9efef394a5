#!/usr/bin/env python3
"""The GPU check: what CPU-only CI cannot verify, in one command and one JSON report (< 6 min).

    python scripts/gpu_check.py [--out gpu-report.json] [--budget 340] [--dry-run]

On a CUDA machine it runs, each step in its own process with its own time limit:

1. ``tests``  — the CUDA test subset: ``pytest tests -k cuda`` (every test with ``cuda`` in its
   module or test name; they skip without a device).
2. ``sync``   — every documented sync-free path under ``torch.cuda.set_sync_debug_mode("error")``:
   the scaler's ``step()`` + ``scale_gradients()`` (``temporal`` and ``same_point``),
   ``RunningMoments.update`` and ``EMAMoments.update`` (a NaN row included), and
   ``FisherCollector.collect`` (after its first, self-checking batch). The eqprop relaxation and
   gradient estimate read one residual per check by design (``check_every``), so they run in
   ``"warn"`` mode and must sync at most once per residual check (+ a small constant).
3. ``bench``  — ``python -m gradstats bench SUITE`` for ``eqprop``, ``fisher``, ``scaling`` and
   ``moments`` at their full (GPU) sizes, JSON records folded into the report.
4. ``nccl``   — ``torchrun --nproc_per_node <number of GPUs>`` (world size 1 with one GPU is still
   an NCCL check): the eqprop trainer (``gradstats eqprop train``), ``gradstats fisher`` on the
   run it wrote, and a worker that checks ``RunningMoments.all_reduce``, a DDP same-point scaler
   (same factor on every rank) and ``FisherCollector.all_reduce`` against one process.

The checks of steps 2 and 4 live in ``scripts/gpu_check_children.py``.

Exit status: 0 when every step passed, 1 when one failed or ran out of time, 2 for bad usage or
a machine without CUDA (one line: ``no CUDA device: ...``). ``--dry-run`` prints the plan and
runs nothing, on any machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
SUITES = {"eqprop": 75, "fisher": 75, "scaling": 45, "moments": 30}  # suite -> time limit (s)
MIN_STEP_S = 5.0  # a step with less time than this left is not started
TEXT = "ROMEO:\nBut soft, what light through yonder window breaks?\nIt is the east.\n\n" * 40


@dataclass
class Step:
    name: str
    part: str
    command: list[str]
    timeout_s: float
    result_file: str | None = None  # JSON written by the step itself, folded into the report
    status: str = "not run"
    seconds: float = 0.0
    returncode: int | None = None
    output_tail: str = ""
    details: Any = None


def plan(work: Path, gpus: int) -> list[Step]:
    """The steps, in order; ``work`` holds their files, ``gpus`` is the torchrun world size."""
    me = str(Path(__file__).resolve().with_name("gpu_check_children.py"))
    run = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}"]
    steps = [
        Step("cuda-tests", "tests", [PY, "-m", "pytest", "tests", "-q", "-p", "no:cacheprovider",
             "-k", "cuda", "-m", "not slow"], 90),
        Step("sync-free-paths", "sync", [PY, me, "sync", "--result",
             str(work / "sync.json")], 75, str(work / "sync.json")),
    ]  # fmt: skip
    for suite, limit in SUITES.items():
        out = work / "bench" / suite
        steps.append(
            Step(f"bench-{suite}", "bench", [PY, "-m", "gradstats", "bench", suite, "--repeats",
                 "5", "--warmup", "1", "--out", str(out)], limit, str(out))
        )  # fmt: skip
    run_dir = work / "eqprop-run"
    steps += [
        Step("nccl-eqprop-train", "nccl", [PY, *run, "-m", "gradstats", "eqprop", "train",
             "--method", "aep", "--steps", "4", "--batch-size", "8", "--block-size", "32",
             "--d-model", "32", "--eval-every", "4", "--eval-batches", "1", "--checkpoint-every",
             "4", "--device", "cuda", "--no-progress", "--out", str(run_dir)], 90),
        Step("nccl-fisher", "nccl", [PY, *run, "-m", "gradstats", "fisher", str(run_dir),
             "--text", str(work / "text.txt"), "--seq-len", "32", "--batch-size", "4",
             "--max-batches", "4", "--device", "cuda", "--no-progress", "--out",
             str(work / "fisher")], 75),
        Step("nccl-moments-scaler-fisher", "nccl", [PY, *run, me, "nccl", "--result",
             str(work / "nccl.json")], 75, str(work / "nccl.json")),
    ]  # fmt: skip
    return steps


# --------------------------------------------------------------------------- driver


def _environment(gpus: int) -> dict[str, Any]:
    import torch

    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpus": [torch.cuda.get_device_name(i) for i in range(gpus)],
        "python": platform.python_version(),
        "machine": platform.node(),
        "git_commit": commit.stdout.strip() or None,
    }


def _fold(step: Step) -> None:
    if not step.result_file or not Path(step.result_file).exists():
        return
    path = Path(step.result_file)
    if path.is_dir():
        step.details = [json.loads(p.read_text()) for p in sorted(path.glob("*.json"))]
    else:
        step.details = json.loads(path.read_text())


def _execute(step: Step, remaining: float) -> None:
    limit = min(step.timeout_s, remaining)
    if limit < MIN_STEP_S:
        step.status = "not run (time budget spent)"
        return
    start = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "4")}
    # A session of its own, so that a timeout also ends torchrun's workers (they hold the GPUs).
    proc = subprocess.Popen(
        step.command,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=limit)
        step.returncode = proc.returncode
        step.status = "passed" if proc.returncode == 0 else "failed"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        step.status = f"timeout after {limit:.0f} s"
    step.seconds = round(time.perf_counter() - start, 1)
    step.output_tail = output[-3000:]
    _fold(step)


def _check_out(out: Path) -> str | None:
    if out.is_dir():
        return f"--out {out} is a folder; give a file name"
    if not out.parent.is_dir():
        return f"--out {out}: no such folder {out.parent}"
    if not os.access(out.parent, os.W_OK):
        return f"--out {out}: cannot write in {out.parent}"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("gpu-report.json"), help="JSON report")
    parser.add_argument("--budget", type=float, default=340.0, help="seconds for all steps")
    parser.add_argument("--dry-run", action="store_true", help="print the plan, run nothing")
    args = parser.parse_args(argv)
    try:
        import torch
    except ImportError as exc:
        print(f"gpu_check: torch is not installed ({exc})", file=sys.stderr)
        return 2
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if args.dry_run:
        steps = plan(Path(tempfile.gettempdir()) / "gradstats-gpu-check", max(gpus, 1))
        note = "" if gpus else " (no CUDA device here: world size 1 shown)"
        print(f"gpu_check plan: {len(steps)} steps, budget {args.budget:.0f} s{note}")
        for step in steps:
            print(
                f"[{step.part}] {step.name} (<= {step.timeout_s:.0f} s): {shlex.join(step.command)}"
            )
        return 0
    if not gpus:
        why = (
            f"torch {torch.__version__} is a CPU-only build; install a CUDA build of torch"
            if torch.version.cuda is None
            else f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU"
        )
        print(f"no CUDA device: {why} (this check needs an NVIDIA GPU)", file=sys.stderr)
        return 2
    problem = _check_out(args.out) or (None if args.budget > 0 else "--budget must be > 0")
    if problem:
        print(f"gpu_check: {problem}", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="gradstats-gpu-check-"))
    (work / "text.txt").write_text(TEXT)
    started, steps = time.perf_counter(), plan(work, gpus)
    for step in steps:
        _execute(step, args.budget - (time.perf_counter() - started))
        print(f"{step.status:10s} {step.seconds:6.1f} s  [{step.part}] {step.name}", flush=True)
    passed = all(step.status == "passed" for step in steps)
    report = {
        "format": "gradstats-gpu-check",
        "version": 1,
        "passed": passed,
        "seconds": round(time.perf_counter() - started, 1),
        "budget_s": args.budget,
        "environment": _environment(gpus),
        "steps": [asdict(step) for step in steps],
    }
    args.out.write_text(json.dumps(report, indent=1, default=str))
    shutil.rmtree(work, ignore_errors=True)
    print(f"{'PASSED' if passed else 'FAILED'} in {report['seconds']} s: report {args.out}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
