r"""Saving and loading a :class:`~gradstats.fisher.FisherResult` as safetensors, with its
specification in the metadata.

File layout (``format`` = ``"gradstats.fisher"``, ``version`` = 2; version 1 files, whose skip
counter was named ``rejected``, load too):

* ``fisher/<param>`` — float32 Fisher per unit (what other tools read; never fp16);
* ``mean_gradient/<param>`` — float32 ḡ when the signal was collected;
* ``group/<family>`` — float32 group traces per unit (these three are absent from the file of
  a collector that holds no batch yet: there is no mean to store);
* ``state/...`` — the float64 sufficient statistics (counts, Σ x, Σ g, M2, per-family moments),
  so a loaded result can keep collecting (:func:`~gradstats.fisher.resume`), merge and
  all-reduce exactly;
* ``assign/<family>/<member>`` — int32 group assignments;
* ``rng/generator`` — ``kind="mc"``: the label generator's uint8 state when it was saved.

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
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
from safetensors.torch import save_file

from gradstats.errors import ConfigurationError, ConfigurationTypeError, StateError
from gradstats.fisher._architectures import check_families
from gradstats.fisher._groups import GroupFamily, GroupMap, Member
from gradstats.fisher._inputs import check_device
from gradstats.fisher._spec import FisherSpec, fingerprint

if TYPE_CHECKING:
    from torch import nn

__all__ = ["FORMAT", "VERSION", "Saved", "read_file", "read_saved", "same_shapes", "write_file"]

FORMAT = "gradstats.fisher"
VERSION = 2
READABLE_VERSIONS = ("1", "2")
GENERATOR_KEY = "rng/generator"
FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


@dataclass(frozen=True)
class Saved:
    """The validated contents of a file: everything a result is built from."""

    config: FisherSpec
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, torch.dtype]
    group_map: GroupMap | None
    state: dict[str, torch.Tensor]  # the float64 sufficient statistics, for load_tensors
    where: str
    device: torch.device | None
    generator_state: torch.Tensor | None = None  # kind="mc": the label generator's state


def write_file(
    path: str | Path,
    *,
    spec: Mapping[str, object],
    dtypes: Mapping[str, torch.dtype],
    shapes: Mapping[str, tuple[int, ...]],
    group_map: GroupMap | None,
    tensors: Mapping[str, torch.Tensor],
) -> Path:
    """Write a result's ``tensors`` (named as in the module docstring, bar ``assign/``) with the
    metadata to ``path`` (safetensors); returns the path."""
    path = Path(path)
    out = dict(tensors)
    families: list[dict[str, object]] = []
    if group_map is not None:
        for f_index, family in enumerate(group_map.families):
            members = []
            for m_index, m in enumerate(family.members):
                out[f"assign/{f_index}/{m_index}"] = torch.tensor(m.assign, dtype=torch.int32)
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
    out = {k: v.detach().contiguous().cpu() for k, v in out.items()}
    params = {
        n: {"shape": list(s), "dtype": str(dtypes[n]).removeprefix("torch.")}
        for n, s in shapes.items()
    }
    groups = (
        None
        if group_map is None
        else {"source": group_map.source, "unmapped": group_map.unmapped, "families": families}
    )
    metadata = {
        "format": FORMAT,
        "version": str(VERSION),
        "spec": json.dumps(dict(spec)),
        "params": json.dumps(params),
        "groups": json.dumps(groups),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, str(path), metadata=metadata)
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


def same_shapes(model: nn.Module, shapes: Mapping[str, tuple[int, ...]]) -> bool:
    """Whether every parameter of ``shapes`` is in ``model`` with that shape."""
    named = dict(model.named_parameters())
    return all(n in named and tuple(named[n].shape) == tuple(s) for n, s in shapes.items())


def read_saved(path: object, device: object = None) -> Saved:
    """Read and validate a file written by :func:`write_file` (nothing is built from it yet:
    the statistics are checked when a result loads them)."""
    target = check_device("device", device)
    if not isinstance(path, (str, Path)):
        raise ConfigurationTypeError(f"path must be a str or Path; got {type(path).__name__}")
    tensors, metadata = read_file(path)
    where = str(path)
    spec = _json(metadata, "spec", where)
    config = FisherSpec.from_saved(spec, where)
    shapes, dtypes = _params(_json(metadata, "params", where), where)
    if cast("Mapping[str, object]", spec)["fingerprint"] != fingerprint(shapes):  # checked
        raise StateError(f"{where}: the spec's fingerprint does not match its params")
    group_map = _group_map(_json(metadata, "groups", where), tensors, shapes, where)
    state = {k[6:]: v for k, v in tensors.items() if k.startswith("state/")}
    rng = tensors.get(GENERATOR_KEY)
    if rng is not None and (
        not config.estimand.sampled or rng.dtype != torch.uint8 or rng.dim() != 1
    ):
        raise StateError(
            f"{where}: {GENERATOR_KEY} must be a 1-D uint8 generator state of a kind='mc' file"
        )
    return Saved(config, shapes, dtypes, group_map, state, where, target, rng)
