r"""Saving and loading a collector as safetensors, with its specification in the metadata.

File layout (``format`` = ``"gradstats.fisher"``, ``version`` = 2; version 1 files, whose skip
counter was named ``rejected``, load too):

* ``fisher/<param>`` — float32 Fisher per unit (what other tools read; never fp16);
* ``mean_gradient/<param>`` — float32 ḡ when the signal was collected;
* ``group/<family>`` — float32 group traces per unit (these three are absent from the file of
  a collector that holds no batch yet: there is no mean to store);
* ``state/...`` — the float64 sufficient statistics (counts, Σ x, Σ g, M2, per-family moments),
  so a loaded collector can keep collecting, merge and all-reduce exactly;
* ``assign/<family>/<member>`` — int32 group assignments.

Metadata (strings): ``format``, ``version``, ``spec`` (JSON: kind, likelihood, unit, counts, dtype,
model fingerprint, ...), ``params`` (JSON names, shapes and dtypes) and ``groups`` (JSON families).

Loading validates the whole file before building anything: metadata that is missing or not
JSON, a spec field outside its valid values, impossible statistics (NaN/±inf, negative counts or
sums of squares, fractional counts), wrong shapes, group maps that do not fit the parameters, or
a ``model`` whose parameters differ from the file's — each is a
:class:`~gradstats.errors.StateError` naming the problem, and nothing is loaded.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import torch
from safetensors.torch import save_file

from gradstats.errors import ConfigurationError, ConfigurationTypeError, StateError
from gradstats.fisher._architectures import check_families
from gradstats.fisher._groups import GroupFamily, GroupMap, Member
from gradstats.fisher._inputs import check_device
from gradstats.fisher._spec import check_spec, fingerprint
from gradstats.fisher._state import FisherState

if TYPE_CHECKING:
    from torch import nn

    from gradstats.fisher._group_reads import GroupReads

__all__ = ["FORMAT", "VERSION", "load_collector", "read_file", "save_collector"]

FORMAT = "gradstats.fisher"
VERSION = 2
READABLE_VERSIONS = ("1", "2")
FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")

C = TypeVar("C", bound="GroupReads")


def save_collector(collector: GroupReads, path: str | Path) -> Path:
    """Write ``collector`` to ``path`` (safetensors); returns the path."""
    if collector.mode != "cumulative":
        raise ConfigurationError(
            "mode='ema' collectors are not saved (an EMA is not a sufficient statistic); use "
            "mode='cumulative'"
        )
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    empty = collector.counts["batches"] == 0  # an empty collector saves (and loads) too
    if not empty:
        for name, value in collector._fisher("unit", torch.float32).items():
            tensors[f"fisher/{name}"] = value
        if collector.collect_signal:
            for name, value in collector._mean_gradient(torch.float32).items():
                tensors[f"mean_gradient/{name}"] = value
        if collector.group_map is not None:
            for fam, value in collector._group_fisher("trace", "unit").items():
                tensors[f"group/{fam}"] = value.to(torch.float32)
    for key, value in collector._state.tensors().items():
        tensors[f"state/{key}"] = value
    families: list[dict[str, object]] = []
    if collector.group_map is not None:
        for f_index, family in enumerate(collector.group_map.families):
            members = []
            for m_index, m in enumerate(family.members):
                tensors[f"assign/{f_index}/{m_index}"] = torch.tensor(m.assign, dtype=torch.int32)
                members.append({"param": m.param, "axis": m.axis, "in_mask": m.in_mask})
            families.append(
                {
                    "name": family.name,
                    "kind": family.kind,
                    "size": family.size,
                    "layer": family.layer,
                    "per_unit": family.per_unit,
                    "members": members,
                }
            )
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    spec = collector.spec() | {"counts": dict(collector.counts)}
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
    """The tensors and metadata of a saved collector, after checking format and version.

    Raises:
        FileNotFoundError: no file at ``path``.
        StateError: not a safetensors file, or not a gradstats Fisher file of a readable
            version.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no Fisher file at {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != FORMAT:
                raise StateError(
                    f"{path} is not a gradstats Fisher file (format {metadata.get('format')!r})"
                )
            if metadata.get("version") not in READABLE_VERSIONS:
                raise StateError(
                    f"{path} has format version {metadata.get('version')!r}; this gradstats "
                    f"reads versions {', '.join(READABLE_VERSIONS)}"
                )
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except StateError:
        raise
    except Exception as error:  # safetensors raises its own SafetensorError, OSError, ...
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise StateError(f"{path} is not a readable safetensors file ({first})") from error
    return tensors, dict(metadata)


def _json(metadata: Mapping[str, str], key: str, where: str) -> object:
    if key not in metadata:
        raise StateError(f"{where}: the metadata lacks {key!r}")
    try:
        return json.loads(metadata[key])
    except (TypeError, ValueError) as error:
        raise StateError(f"{where}: metadata {key!r} is not valid JSON ({error})") from error


def _params(data: object, where: str) -> tuple[dict[str, tuple[int, ...]], dict[str, torch.dtype]]:
    if not isinstance(data, Mapping) or not data:
        raise StateError(f"{where}: metadata 'params' must be a non-empty JSON object")
    shapes, dtypes = {}, {}
    for name, entry in data.items():
        shape = entry.get("shape") if isinstance(entry, Mapping) else None
        dtype = entry.get("dtype") if isinstance(entry, Mapping) else None
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise StateError(f"{where}: params[{name!r}] needs a 'shape' list of ints >= 0")
        if dtype not in FLOAT_DTYPES:
            raise StateError(
                f"{where}: params[{name!r}] 'dtype' must be one of {', '.join(FLOAT_DTYPES)}; "
                f"got {dtype!r}"
            )
        shapes[str(name)] = tuple(shape)
        dtypes[str(name)] = getattr(torch, dtype)
    return shapes, dtypes


def _group_map(
    data: object,
    tensors: Mapping[str, torch.Tensor],
    shapes: dict[str, tuple[int, ...]],
    where: str,
) -> GroupMap | None:
    if data is None:
        return None
    if not isinstance(data, Mapping):
        raise StateError(f"{where}: metadata 'groups' is malformed (not a JSON object or null)")
    try:
        families = []
        for f_index, fam in enumerate(data["families"]):
            members = []
            for i, m in enumerate(fam["members"]):
                assign = tensors[f"assign/{f_index}/{i}"]
                if assign.dim() != 1 or assign.is_floating_point():
                    raise StateError(f"{where}: assign/{f_index}/{i} must be a 1-d int tensor")
                axis, in_mask = m["axis"], m["in_mask"]
                if not isinstance(axis, int) or not isinstance(in_mask, bool):
                    raise StateError(f"{where}: group member {f_index}/{i} is malformed")
                members.append(Member(str(m["param"]), axis, tuple(assign.tolist()), in_mask))
            size, per_unit = fam["size"], fam["per_unit"]
            if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                raise StateError(f"{where}: group family {fam['name']!r} has size {size!r}")
            layer = fam["layer"]
            if layer is not None and (isinstance(layer, bool) or not isinstance(layer, int)):
                raise StateError(f"{where}: group family {fam['name']!r}: layer must be int/null")
            if not isinstance(per_unit, bool):
                raise StateError(f"{where}: group family {fam['name']!r}: per_unit must be bool")
            families.append(
                GroupFamily(
                    str(fam["name"]), str(fam["kind"]), size, tuple(members), layer, per_unit
                )
            )
        unmapped = [str(n) for n in data["unmapped"]]
        result = GroupMap(families, unmapped, str(data["source"]))
    except StateError:
        raise
    except (KeyError, TypeError, AttributeError, ValueError) as error:
        raise StateError(f"{where}: metadata 'groups' is malformed ({error!r})") from error
    try:
        check_families(result.families, shapes)
    except ConfigurationError as error:
        raise StateError(f"{where}: the group map does not fit the parameters: {error}") from error
    return result


def _model_shapes(model: nn.Module, names: list[str]) -> dict[str, tuple[int, ...]] | None:
    named = dict(model.named_parameters())
    if any(n not in named for n in names):
        return None
    return {n: tuple(named[n].shape) for n in names}


def load_collector(
    build: Callable[..., C],
    blank: Callable[[], C],
    path: str | Path,
    model: nn.Module | None = None,
    likelihood: object = None,
    device: torch.device | str | None = None,
) -> C:
    """Rebuild a collector from ``path``; with ``model`` it keeps collecting (hooks attached).

    ``build`` is the collector class (called like its constructor), ``blank`` makes an instance
    without running the constructor (a collector without a model)."""
    target = check_device("device", device)
    if model is not None and not isinstance(model, torch.nn.Module):
        raise ConfigurationTypeError(
            f"model must be a torch.nn.Module or None; got {type(model).__name__}"
        )
    if not isinstance(path, (str, Path)):
        raise ConfigurationTypeError(f"path must be a str or Path; got {type(path).__name__}")
    tensors, metadata = read_file(path)
    where = str(path)
    spec = check_spec(_json(metadata, "spec", where), where)
    shapes, dtypes = _params(_json(metadata, "params", where), where)
    if spec.fingerprint != fingerprint(shapes):
        raise StateError(f"{where}: the spec's fingerprint does not match its params")
    group_map = _group_map(_json(metadata, "groups", where), tensors, shapes, where)
    per_unit = spec.kind != "batch_grad_sq"
    families = group_map.families if group_map is not None else []
    state = FisherState(
        shapes,
        torch.device("cpu"),
        unit=spec.unit,
        mode="cumulative",
        beta=spec.beta,
        signal=spec.signal,
        element_se=spec.element_se,
        families=[(f.name, f.size) for f in families if f.per_unit and per_unit],
    )
    state_tensors = {k[6:]: v for k, v in tensors.items() if k.startswith("state/")}
    state.load_tensors(state_tensors, where)  # validates everything; raises StateError
    config = spec.likelihood_config
    if model is not None:
        if _model_shapes(model, list(shapes)) != shapes:
            raise StateError(
                f"{where} was collected on a different model: its parameters (names and shapes, "
                f"fingerprint {spec.fingerprint}) are not all in this model"
            )
        lik = likelihood
        if lik is None:
            if str(config["likelihood"]).startswith("callable:"):
                raise ConfigurationError(
                    f"{where} was collected with a callable likelihood ({config['likelihood']}); "
                    "pass likelihood= to load() to keep collecting"
                )
            lik = config["likelihood"]
        collector = build(
            model,
            spec.kind,
            lik,
            spec.unit,
            mc_samples=spec.mc_samples,
            seed=spec.seed,
            params=list(shapes),
            groups=group_map,
            mode="cumulative",
            beta=spec.beta,
            signal=spec.signal,
            element_se=spec.element_se,
            loss_reduction=config.get("loss_reduction", "sum"),
            nonfinite=spec.nonfinite,
        )
    else:
        collector = blank()
        collector.model, collector._engine, collector.likelihood = None, None, None
        collector._likelihood_config = dict(config)
        collector.kind, collector.unit, collector.mode = spec.kind, spec.unit, "cumulative"
        collector.beta, collector.nonfinite = spec.beta, spec.nonfinite
        collector.mc_samples, collector.seed = spec.mc_samples, spec.seed
        collector.collect_signal, collector.element_se = spec.signal, spec.element_se
        collector.group_map = group_map
        collector._dtypes = dtypes
        collector._setup(shapes, target or torch.device("cpu"), per_unit)
    collector._state.load_tensors(state_tensors, where)  # already validated: cannot fail
    return collector
