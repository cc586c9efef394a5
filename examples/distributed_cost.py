"""What each pillar communicates under torch.distributed, measured on 1 and 2 CPU ranks (gloo).

Every collective is counted where it is issued: ``torch.distributed`` functions are wrapped in
each process, and DDP's gradient buckets are counted by a communication hook. For each pillar
the script reports bytes per step (or per collection) and wall time per step at world size 1
and 2, with the per-rank batch fixed (so 2 ranks process twice the data per step).

* ``scaler``: an MLP under DDP with the ``same_point`` VarianceGradientScaler (the rank's local
  gradient vs the reduced one) — DDP's gradient all-reduce plus the scaler's one small
  all-reduce of 2 float64 numbers per parameter tensor;
* ``fisher``: ``FisherCollector.collect_loader(distributed=True)`` on an MLP — batches sharded
  over ranks, one all-reduce of the float64 statistics at the end;
* ``eqprop``: the equilibrium-transformer trainer (``gradstats.eqprop.train.train``) inside the
  process group — one coalesced all-reduce of the gradients per step plus small diagnostics.

Run: ``python examples/distributed_cost.py`` (``--smoke``: tiny sizes, seconds; ``--json F``).
"""

from __future__ import annotations

import argparse
import functools
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from gradstats.testing import run_gloo

_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce")
_SCOPE = {"label": None}  # set while DDP's communication hook runs


def _count_collectives(counter: dict) -> None:
    """Wrap the torch.distributed collectives of this process so that they add their bytes."""

    def wrap(name, original):
        @functools.wraps(original)
        def counted(tensor, *args, **kwargs):
            if isinstance(tensor, torch.Tensor):
                key = _SCOPE["label"] or name
                counter[key] = counter.get(key, 0) + tensor.numel() * tensor.element_size()
            return original(tensor, *args, **kwargs)

        return counted

    for name in _COLLECTIVES:
        setattr(dist, name, wrap(name, getattr(dist, name)))


def _mlp(width: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
                         nn.Linear(width, 10))  # fmt: skip


def _scaler(rank: int, world: int, width: int, steps: int, batch: int) -> dict:
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    from gradstats import VarianceGradientScaler

    counter: dict = {}
    _count_collectives(counter)
    model = nn.parallel.DistributedDataParallel(_mlp(width))

    def counting_hook(state, bucket):
        _SCOPE["label"] = "DDP gradients"
        try:
            return allreduce_hook(state, bucket)
        finally:
            _SCOPE["label"] = None

    model.register_comm_hook(None, counting_hook)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    vgs = VarianceGradientScaler(
        model.module.named_parameters(), statistic="same_point", rule="shrink"
    )
    g = torch.Generator().manual_seed(rank)
    start = None
    for step in range(steps + 2):  # 2 warm-up steps
        if step == 2:
            counter.clear()
            start = time.perf_counter()
        x = torch.randn(batch, 64, generator=g)
        y = torch.randint(0, 10, (batch,), generator=g)
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        vgs.step()
        opt.step()
    seconds = (time.perf_counter() - start) / steps
    factor = vgs.get_scaling_factor()
    return {"seconds_per_step": seconds, "bytes": {k: v / steps for k, v in counter.items()},
            "factor": factor, "params": sum(p.numel() for p in model.parameters()),
            "tensors": len(list(model.parameters()))}  # fmt: skip


def _fisher(rank: int, world: int, width: int, batches: int, batch: int) -> dict:
    from gradstats import FisherCollector

    counter: dict = {}
    _count_collectives(counter)
    model = _mlp(width)
    g = torch.Generator().manual_seed(0)  # every rank reads the same loader; it shards by index
    loader = [(torch.randn(batch, 64, generator=g), torch.randint(0, 10, (batch,), generator=g))
              for _ in range(batches * world)]  # fmt: skip
    fc = FisherCollector(model, "empirical", "classification", "sample")
    start = time.perf_counter()
    fc.collect_loader(loader, distributed=world > 1, progress=False)
    seconds = time.perf_counter() - start
    fc.close()
    params = sum(p.numel() for p in model.parameters())
    return {"seconds_per_batch_per_rank": seconds / batches, "bytes": counter,
            "samples": fc.counts["samples"], "params": params}  # fmt: skip


def _eqprop(rank: int, world: int, steps: int, d_model: int, block: int, batch: int, out: str):
    from gradstats.eqprop.train import TrainConfig, train

    counter: dict = {}
    _count_collectives(counter)
    config = TrainConfig(
        method="aep", steps=steps, out=Path(out) / f"world{world}", d_model=d_model, n_heads=4,
        block_size=block, batch_size=batch, eval_every=10_000, spot_check_every=0,
        checkpoint_every=10_000, threads=1, progress=False,
    )  # fmt: skip
    from gradstats.data import load_corpus
    from gradstats.eqprop.train import read_metrics

    vocab = load_corpus(config.data).vocab_size
    params = sum(p.numel() for p in config.build_model(vocab).parameters())
    result = train(config)
    times = [r["time"] for r in read_metrics(result.metrics) if "time" in r]
    seconds = (times[-1] - times[0]) / max(1, len(times) - 1)  # cumulative; the first step out
    return {"seconds_per_step": seconds, "bytes": {k: v / steps for k, v in counter.items()},
            "params": params}  # fmt: skip


def _row(name: str, world: int, result: dict, per: str, time_key: str) -> list:
    total = sum(result["bytes"].values())
    parts = ", ".join(f"{k} {v:,.0f}" for k, v in sorted(result["bytes"].items())) or "none"
    return [name, world, f"{result['params']:,}", f"{total:,.0f} per {per}", parts,
            f"{1000 * result[time_key]:.1f} ms"]  # fmt: skip


def main(argv: list[str] | None = None) -> dict[tuple[str, int], dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (seconds)")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    width, steps, batch = (32, 3, 8) if args.smoke else (1024, 30, 64)
    eq = (2, 16, 8, 4) if args.smoke else (10, 64, 64, 16)  # steps, d_model, block, batch
    results, rows = {}, []
    with tempfile.TemporaryDirectory() as folder:
        for name, fn, fn_args, per, time_key in (
            ("scaler", _scaler, (width, steps, batch), "step", "seconds_per_step"),
            ("fisher", _fisher, (width, steps, batch), "collection", "seconds_per_batch_per_rank"),
            ("eqprop", _eqprop, (*eq, folder), "step", "seconds_per_step"),
        ):
            for world in (1, 2):
                results[name, world] = run_gloo(fn, world, fn_args)[0]
                rows.append(_row(_LABELS[name], world, results[name, world], per, time_key))
    from gradstats._format import format_table

    header = ["pillar", "ranks", "parameters", "bytes sent", "by collective", "time"]
    print(format_table(rows, header, markdown=True))
    if args.json:
        args.json.write_text(json.dumps({f"{k[0]}/{k[1]}": v for k, v in results.items()}))
    return results


_LABELS = {
    "scaler": "scaler (DDP, same_point)",
    "fisher": "fisher (collect_loader, per batch)",
    "eqprop": "eqprop trainer (aep)",
}


if __name__ == "__main__":
    main()
