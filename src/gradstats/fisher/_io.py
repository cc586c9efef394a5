r"""Saving and loading a collector as safetensors, with its specification in the metadata.

File layout (``format`` = ``"gradstats.fisher"``, ``version`` = 1):

* ``fisher/<param>`` — float32 Fisher per unit (what other tools read; never fp16);
* ``mean_gradient/<param>`` — float32 ḡ when the signal was collected;
* ``group/<family>`` — float32 group traces per unit;
* ``state/...`` — the float64 sufficient statistics (counts, Σ x, Σ g, M2, per-family moments),
  so a loaded collector can keep collecting, merge and all-reduce exactly;
* ``assign/<family>/<member>`` — int32 group assignments.

Metadata (strings): ``format``, ``version``, ``spec`` (JSON: kind, likelihood, unit, counts, dtype,
model fingerprint, ...), ``params`` (JSON names, shapes and dtypes) and ``groups`` (JSON families).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from gradstats.fisher._groups import GroupFamily, GroupMap, Member

__all__ = ["FORMAT", "VERSION", "load_collector", "save_collector"]

FORMAT = "gradstats.fisher"
VERSION = 1


def save_collector(collector, path: str | Path) -> Path:
    """Write ``collector`` to ``path`` (safetensors); returns the path."""
    if collector.mode != "cumulative":
        raise ValueError(
            "mode='ema' collectors are not saved (an EMA is not a sufficient statistic); use "
            "mode='cumulative'"
        )
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    for name, value in collector.fisher(dtype=torch.float32).items():
        tensors[f"fisher/{name}"] = value
    if collector.collect_signal:
        for name, value in collector.mean_gradient(dtype=torch.float32).items():
            tensors[f"mean_gradient/{name}"] = value
    if collector.group_map is not None:
        for fam, value in collector.group_fisher("trace").items():
            tensors[f"group/{fam}"] = value.to(torch.float32)
    for key, value in collector._state.tensors().items():
        tensors[f"state/{key}"] = value
    families = []
    if collector.group_map is not None:
        for f_index, fam in enumerate(collector.group_map.families):
            members = []
            for m_index, m in enumerate(fam.members):
                key = f"assign/{f_index}/{m_index}"
                tensors[key] = torch.tensor(m.assign, dtype=torch.int32)
                members.append({"param": m.param, "axis": m.axis, "in_mask": m.in_mask})
            families.append(
                {
                    "name": fam.name,
                    "kind": fam.kind,
                    "size": fam.size,
                    "layer": fam.layer,
                    "per_unit": fam.per_unit,
                    "members": members,
                }
            )
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    spec = collector.spec() | {"counts": collector.counts}
    params = {
        n: {"shape": list(s), "dtype": str(collector._dtypes[n]).removeprefix("torch.")}
        for n, s in collector._state.shapes.items()
    }
    groups = (
        None
        if collector.group_map is None
        else {
            "source": collector.group_map.source,
            "unmapped": collector.group_map.unmapped,
            "families": families,
        }
    )
    metadata = {
        "format": FORMAT,
        "version": str(VERSION),
        "spec": json.dumps(spec),
        "params": json.dumps(params),
        "groups": json.dumps(groups),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    return path


def read_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of a saved collector, after checking format and version."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no Fisher file at {path}")
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if metadata.get("format") != FORMAT:
        raise ValueError(
            f"{path} is not a gradstats Fisher file (format {metadata.get('format')!r})"
        )
    if metadata.get("version") != str(VERSION):
        raise ValueError(
            f"{path} has format version {metadata.get('version')!r}; this gradstats reads {VERSION}"
        )
    return load_file(str(path)), metadata


def _group_map(data: dict | None, tensors: dict[str, torch.Tensor]) -> GroupMap | None:
    if data is None:
        return None
    families = []
    for f_index, fam in enumerate(data["families"]):
        members = tuple(
            Member(
                m["param"],
                m["axis"],
                tuple(tensors[f"assign/{f_index}/{i}"].tolist()),
                m["in_mask"],
            )
            for i, m in enumerate(fam["members"])
        )
        families.append(
            GroupFamily(
                fam["name"], fam["kind"], fam["size"], members, fam["layer"], fam["per_unit"]
            )
        )
    return GroupMap(families, list(data["unmapped"]), data["source"])


def load_collector(cls, path: str | Path, model=None, likelihood=None, device=None):
    """Rebuild a collector from ``path``; with ``model`` it keeps collecting (hooks attached)."""
    tensors, metadata = read_file(path)
    spec = json.loads(metadata["spec"])
    params = json.loads(metadata["params"])
    group_map = _group_map(json.loads(metadata["groups"]), tensors)
    shapes = {n: tuple(p["shape"]) for n, p in params.items()}
    state = {k.removeprefix("state/"): v for k, v in tensors.items() if k.startswith("state/")}
    if model is not None:
        config = spec["likelihood_config"]
        lik = likelihood
        if lik is None:
            if config["likelihood"].startswith("callable:"):
                raise ValueError(
                    f"{path} was collected with a callable likelihood ({config['likelihood']}); "
                    "pass likelihood= to load() to keep collecting"
                )
            lik = config["likelihood"]
        collector = cls(
            model,
            spec["kind"],
            lik,
            spec["unit"],
            mc_samples=spec["mc_samples"],
            seed=spec["seed"],
            params=list(shapes),
            groups=group_map,
            mode=spec["mode"],
            beta=spec["beta"],
            signal=spec["signal"],
            element_se=spec["element_se"],
            loss_reduction=config.get("loss_reduction", "sum"),
        )
        if collector._fingerprint != spec["fingerprint"]:
            raise ValueError(
                f"the model's parameters do not match {path}: fingerprint "
                f"{collector._fingerprint} vs {spec['fingerprint']}"
            )
    else:
        collector = cls.__new__(cls)
        collector.model, collector._engine, collector.likelihood = None, None, None
        collector._likelihood_config = spec["likelihood_config"]
        for key in ("kind", "unit", "mode", "beta", "mc_samples", "seed", "element_se"):
            setattr(collector, key, spec[key])
        collector.collect_signal = spec["signal"]
        collector.group_map = group_map
        collector._dtypes = {n: getattr(torch, p["dtype"]) for n, p in params.items()}
        device = torch.device(device or "cpu")
        collector._setup(shapes, device, spec["kind"] != "batch_grad_sq")
    collector._state.load_tensors(state)
    return collector
