#!/usr/bin/env python3
"""The checks ``scripts/gpu_check.py`` runs in child processes (see its docstring).

    python scripts/gpu_check_children.py sync --result FILE [--device cuda]
    torchrun --nproc_per_node N scripts/gpu_check_children.py nccl --result FILE [--device cuda]

``sync``: the documented sync-free paths under ``torch.cuda.set_sync_debug_mode``; ``nccl``: the
collectives of each pillar against one process. Each check's outcome goes to FILE (JSON, rank 0);
the exit status is 1 when one failed. ``--device cpu`` (gloo, no sync checking) runs the same calls
without a GPU: the tests use it to keep the calls in step with the library.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

DEVICE = "cuda"


# --------------------------------------------------------------------------- child: sync checks


@contextmanager
def _sync_mode(mode: str) -> Iterator[list[warnings.WarningMessage]]:
    import torch

    cuda = DEVICE == "cuda"
    if cuda:
        torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if cuda:
            torch.cuda.set_sync_debug_mode(mode)
        try:
            yield caught
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode(0)


def _syncs(caught: list[warnings.WarningMessage]) -> int:
    return sum("synchroniz" in str(w.message) for w in caught)


def _check_scaler(statistic: str) -> dict[str, Any]:
    import torch

    from gradstats import VarianceGradientScaler

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 8))
    model = model.to(DEVICE)
    vgs = VarianceGradientScaler(
        model.named_parameters(),
        statistic=statistic,
        rule="shrink",
        log_every=10**6,
        batch_size=16,
    )
    x = torch.randn(16, 64, device=DEVICE)

    def one_step() -> None:
        model.zero_grad()
        for _ in range(2):  # two micro-batches: same_point needs them
            model(x).square().mean().backward()
        vgs.step()
        vgs.scale_gradients()

    one_step()  # builds cached index masks (one host-to-device copy each)
    with _sync_mode("error"):
        for _ in range(3):
            one_step()
    return {"factor": vgs.get_scaling_factor()}  # explicit host read, outside the check


def _check_moments(kind: str) -> dict[str, Any]:
    import torch

    from gradstats.moments import EMAMoments, RunningMoments

    x = torch.randn(64, 256, device=DEVICE)
    bad = x.clone()
    bad[3, 7] = float("nan")
    if kind == "running":
        # float64 and the shifted float32 state; a masked update too. (Weighted updates are
        # left out: checking the weights reads them back, a documented sync.)
        counts = {}
        mask = torch.rand(64, device=DEVICE) > 0.5
        for dtype in (torch.float64, torch.float32):
            rm = RunningMoments(shape=(256,), dtype=dtype)
            rm.update(x)  # places the state on the device
            with _sync_mode("error"):
                rm.update(x + 1e5, mask=mask)
                rm.update(bad)
            counts[str(dtype)] = str(rm.count)
        return counts
    ema = EMAMoments(beta=0.9, shape=(256,))
    ema.update(x[0])
    with _sync_mode("error"):
        for row in (x[1], bad[3], x[2]):
            ema.update(row)
    return {}


def _check_fisher() -> dict[str, Any]:
    import torch

    from gradstats import FisherCollector

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 5))
    model = model.to(DEVICE)
    x, y = torch.randn(64, 32, device=DEVICE), torch.randint(0, 5, (64,), device=DEVICE)
    fc = FisherCollector(model, kind="empirical", likelihood="classification", unit="sample")
    fc.collect(x, y)  # the first batch checks the hooks against autograd (host reads)
    with _sync_mode("error"):
        fc.collect(x, y)
        fc.collect(x, y)
    return {"counts": {k: str(v) for k, v in dict(fc.counts).items()}}


def _check_eqprop(what: str) -> dict[str, Any]:
    import torch

    from gradstats.eqprop import estimate_gradient, relax
    from gradstats.eqprop.models import TanhModel

    g = torch.Generator().manual_seed(0)
    model = TanhModel.random(256, 64, 16, generator=g).to(DEVICE)
    x = torch.randn(64, 64, generator=g, dtype=torch.float64).to(DEVICE)
    y = torch.randn(64, 16, generator=g, dtype=torch.float64).to(DEVICE)
    relax(model, x)  # warm-up
    with _sync_mode("warn") as caught:
        if what == "relax":
            _, stats = relax(model, x)
            phases = [stats]
        else:
            est = estimate_gradient(model, x, y, "aep", beta=0.05)
            phases = [s for s in est.stats.values() if hasattr(s, "trace_steps")]
    syncs, checks = _syncs(caught), sum(len(s.trace_steps) for s in phases)
    if syncs > checks + 8:
        raise AssertionError(f"{syncs} syncs for {checks} residual checks (allowed: checks + 8)")
    return {"syncs": syncs, "residual_checks": checks}


SYNC_CHECKS: dict[str, Callable[[], dict[str, Any]]] = {
    "scaler step (temporal)": lambda: _check_scaler("temporal"),
    "scaler step (same_point)": lambda: _check_scaler("same_point"),
    "RunningMoments.update": lambda: _check_moments("running"),
    "EMAMoments.update": lambda: _check_moments("ema"),
    "FisherCollector.collect": _check_fisher,
    "eqprop relax (one sync per residual check)": lambda: _check_eqprop("relax"),
    "eqprop estimate_gradient aep (one sync per check)": lambda: _check_eqprop("estimate"),
}


def _run_checks(checks: dict[str, Callable[[], dict[str, Any]]]) -> tuple[list[dict], bool]:
    results, ok = [], True
    for name, check in checks.items():
        start = time.perf_counter()
        try:
            entry: dict[str, Any] = {"check": name, "status": "passed", **check()}
        except Exception as exc:  # one failed check must not hide the others
            entry = {"check": name, "status": "failed", "error": f"{type(exc).__name__}: {exc}"}
            ok = False
        entry["seconds"] = round(time.perf_counter() - start, 3)
        results.append(entry)
    return results, ok


# --------------------------------------------------------------------------- child: NCCL worker


def _nccl_worker() -> tuple[list[dict], bool]:
    import torch
    import torch.distributed as dist

    from gradstats import FisherCollector, RunningMoments, VarianceGradientScaler

    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = DEVICE == "cuda"
    if cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    g = torch.Generator().manual_seed(0)
    data = torch.randn(64 * world, 8, generator=g, dtype=torch.float64)
    x_all = torch.randn(32 * world, 16, generator=g)
    y_all = torch.randint(0, 4, (32 * world,), generator=g)

    def moments() -> dict[str, Any]:
        rm = RunningMoments(shape=(8,)).update(data[rank::world].to(device))
        rm.all_reduce()
        var, mean = torch.var_mean(data, dim=0, correction=1)
        torch.testing.assert_close(rm.mean.cpu(), mean)
        torch.testing.assert_close(rm.variance(unbiased=True).cpu(), var)
        return {}

    def scaler() -> dict[str, Any]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1)
        )
        ddp = torch.nn.parallel.DistributedDataParallel(
            model.to(device), device_ids=[local] if cuda else None
        )
        vgs = VarianceGradientScaler(
            model.named_parameters(),
            statistic="same_point",
            rule="shrink",
            batch_size=32,
            log_every=10**6,
        )
        for step in range(5):
            x = x_all[rank::world].to(device) * (1 + step)
            ddp.zero_grad()
            ddp(x).square().mean().backward()
            vgs.step()
        factor = torch.tensor([vgs.get_scaling_factor()], device=device)
        factors = [torch.zeros_like(factor) for _ in range(world)]
        dist.all_gather(factors, factor)
        values = [float(f) for f in factors]
        if len(set(values)) != 1:
            raise AssertionError(f"ranks disagree on the factor: {values}")
        return {"factor": values[0]}

    def fisher() -> dict[str, Any]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4)
        )
        model = model.to(device)
        shard = FisherCollector(model, kind="empirical", likelihood="classification")
        shard.collect(x_all[rank::world].to(device), y_all[rank::world].to(device)).all_reduce()
        full = FisherCollector(model, kind="empirical", likelihood="classification")
        full.collect(x_all.to(device), y_all.to(device))
        for name, value in full.fisher().items():
            torch.testing.assert_close(shard.fisher()[name], value)
        return {}

    results, ok = _run_checks({"RunningMoments.all_reduce": moments,
                               "DDP same_point scaler": scaler,
                               "FisherCollector.all_reduce": fisher})  # fmt: skip
    for entry in results:
        entry["world_size"] = world
    dist.destroy_process_group()
    return (results, ok) if rank == 0 else ([], ok)


def _child(kind: str, result: Path) -> int:
    results, ok = _run_checks(SYNC_CHECKS) if kind == "sync" else _nccl_worker()
    if results:
        result.write_text(json.dumps(results, indent=1))
    for entry in results:
        print(f"{entry['status']:7s} {entry['check']}  {entry.get('error', '')}")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    global DEVICE
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=("sync", "nccl"))
    parser.add_argument("--result", type=Path, required=True)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    args = parser.parse_args(argv)
    DEVICE = args.device
    return _child(args.kind, args.result)


if __name__ == "__main__":
    sys.exit(main())
