"""Composition of ``experiments/`` into ``params.yaml``, the way DVC's Hydra integration does it.

``experiments/`` is a Hydra config directory (``.dvc/config`` enables ``hydra``)::

    experiments/config.yaml        defaults list + your own overrides
    experiments/defaults.yaml      every setting with its default (generated from the code)
    experiments/preset/<name>.yaml one file per preset (``# @package _global_``)

``dvc exp run [-S key=value] [-S preset=<name>]`` composes these into ``params.yaml`` (Hydra's
compose API) before it runs the pipeline, so ``params.yaml`` holds every effective setting and
DVC sees, diffs and records all of them. :func:`compose` does the same composition in-process,
for ``harness config compose`` (after editing ``experiments/`` when you run plain ``dvc repro``)
and to tell, for every key, which file set it (errors and warnings name that file). A test
checks that it gives exactly what Hydra gives.

Only the defaults-list forms used here are understood: a config name (``defaults``), one
``preset: <name>`` group entry and ``_self_``; anything else is a clear error.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from harness.errors import HarnessError

__all__ = [
    "CONFIG_FILE",
    "DEFAULTS_FILE",
    "EXPERIMENTS_DIR",
    "PRESET_DIR",
    "Composition",
    "available_presets",
    "compose",
    "differences",
    "dump_params",
    "is_composed",
    "record_origin",
    "replace_origin",
]

EXPERIMENTS_DIR = "experiments"
CONFIG_FILE = f"{EXPERIMENTS_DIR}/config.yaml"
DEFAULTS_FILE = f"{EXPERIMENTS_DIR}/defaults.yaml"
PRESET_GROUP = "preset"
PRESET_DIR = f"{EXPERIMENTS_DIR}/{PRESET_GROUP}"
GLOBAL_PACKAGE = "# @package _global_"
SELF = "_self_"


class Composition:
    """A composed config and, for every key path, the file that set it last."""

    def __init__(self, data: dict[str, Any], origin: dict[tuple[str, ...], str]) -> None:
        self.data = data
        self.origin = origin

    @property
    def preset(self) -> str | None:
        """The preset this composition selected."""
        value = self.data.get("preset")
        return value if isinstance(value, str) else None


def _error(problem: str) -> HarnessError:
    from harness.config import ConfigError

    return ConfigError([problem])


def available_presets(root: str | Path = ".") -> list[str]:
    """Names of the presets in ``<root>/experiments/preset``."""
    return sorted(p.stem for p in (Path(root) / PRESET_DIR).glob("*.yaml"))


def _defaults_list(root: Path, body: dict[str, Any]) -> list[tuple[str, str | None]]:
    """``[(kind, name)]`` from config.yaml's ``defaults``: ``("config", "defaults")``,
    ``("preset", "tiny-cpu")`` and ``("self", None)`` (implicitly last, as in Hydra >= 1.1)."""
    entries = body.pop("defaults", [])
    if not isinstance(entries, list):
        raise _error(f"{CONFIG_FILE}: defaults: expected a list")
    out: list[tuple[str, str | None]] = []
    for entry in entries:
        if entry == SELF:
            out.append(("self", None))
        elif isinstance(entry, str) and "/" not in entry and "@" not in entry:
            out.append(("config", entry.removesuffix(".yaml")))
        elif (
            isinstance(entry, dict)
            and list(entry) == [PRESET_GROUP]
            and isinstance(entry[PRESET_GROUP], str)
        ):
            out.append(("preset", entry[PRESET_GROUP]))
        else:
            raise _error(
                f"{CONFIG_FILE}: defaults: unsupported entry {entry!r}; use config names "
                f"(e.g. defaults), one '{PRESET_GROUP}: <name>' entry and {SELF}"
            )
    if ("self", None) not in out:
        out.append(("self", None))
    return out


def _preset_file(root: Path, name: str, source: str) -> tuple[str, dict[str, Any]]:
    from harness.config import load_yaml

    path = root / PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        names = ", ".join(available_presets(root)) or "none found"
        raise _error(f"{source}: preset: unknown preset {name!r}; available: {names}")
    label = f"{PRESET_DIR}/{path.name}"
    data = load_yaml(path)  # first: an unreadable file (not UTF-8, bad YAML) is its error
    if GLOBAL_PACKAGE not in path.read_text(encoding="utf-8").splitlines()[:5]:
        # Without it Hydra nests the whole file under a `preset:` key.
        raise _error(f"{label}: must start with the line '{GLOBAL_PACKAGE}'")
    if data.get("preset") != name:
        raise _error(f"{label}: preset: must be {name!r} (the file's own name)")
    return label, data


def merge(
    base: dict[str, Any],
    override: Mapping[str, Any],
    origin: dict[tuple[str, ...], str],
    source: str,
    prefix: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Hydra's (OmegaConf's) merge: mappings merge key by key, anything else is replaced;
    ``origin`` records ``source`` for every key path it sets."""
    out = dict(base)
    for key, value in override.items():
        path = (*prefix, str(key))
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(dict(out[key]), value, origin, source, path)
            origin.setdefault(path, source)
            continue
        out[key] = value
        replace_origin(origin, value, source, path)
    return out


def replace_origin(
    origin: dict[tuple[str, ...], str], value: Any, source: str, path: tuple[str, ...]
) -> None:
    """``path`` was replaced by ``value``: forget the origins of the keys that were below it,
    then record ``source`` for ``path`` and every key below it in ``value``."""
    for known in [p for p in origin if p[: len(path)] == path]:
        del origin[known]
    record_origin(origin, value, source, path)


def record_origin(
    origin: dict[tuple[str, ...], str], value: Any, source: str, path: tuple[str, ...]
) -> None:
    """Record ``source`` as the origin of ``path`` and of every key below it in ``value``."""
    # Re-insert, never update in place: ``origin`` stays in the order the keys were applied, so
    # its last entries come from the highest-priority source (command line > params > preset).
    origin.pop(path, None)
    origin[path] = source
    if isinstance(value, Mapping):
        for key, sub in value.items():
            record_origin(origin, sub, source, (*path, str(key)))


def compose(root: str | Path, preset: str | None = None, source: str = CONFIG_FILE) -> Composition:
    """Compose ``experiments/`` like ``dvc exp run`` (Hydra) does; ``preset`` overrides the
    defaults list's choice, as ``-S preset=<name>`` does (``source`` is blamed if unknown)."""
    from harness.config import load_yaml

    root = Path(root)
    body = load_yaml(root / CONFIG_FILE)
    data: dict[str, Any] = {}
    origin: dict[tuple[str, ...], str] = {}
    for kind, name in _defaults_list(root, body):
        if kind == "self":
            label, part = CONFIG_FILE, body
        elif kind == "preset":
            chosen = preset or name
            assert chosen is not None
            label, part = _preset_file(root, chosen, source if preset else CONFIG_FILE)
        else:
            label = f"{EXPERIMENTS_DIR}/{name}.yaml"
            part = load_yaml(root / label)
        data = merge(data, part, origin, label)
    return Composition(data, origin)


def dump_params(data: Mapping[str, Any]) -> str:
    """``params.yaml`` text, formatted exactly as DVC's Hydra composition writes it."""
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.create(dict(data)))


def is_composed(data: Mapping[str, Any]) -> bool:
    """Whether a params mapping holds every top-level key of the typed config, as a composition
    with ``experiments/defaults.yaml`` does (rather than a hand-written ``preset:`` plus a few
    overrides)."""
    from harness.config import HarnessConfig

    return set(HarnessConfig.model_fields) <= set(data)


def differences(
    data: Mapping[str, Any], reference: Mapping[str, Any], prefix: str = ""
) -> list[tuple[str, Any, Any]]:
    """``[(dotted key, value in data, value in reference)]`` for every leaf that differs."""
    out: list[tuple[str, Any, Any]] = []
    for key in sorted(set(data) | set(reference), key=str):
        mine, theirs = data.get(key), reference.get(key)
        dotted = f"{prefix}{key}"
        if isinstance(mine, Mapping) and isinstance(theirs, Mapping):
            out.extend(differences(mine, theirs, dotted + "."))
        elif mine != theirs:
            out.append((dotted, mine, theirs))
    return out


DEFAULTS_HEADER = (
    "# Every setting with its code default. Generated by `harness config defaults --write`;\n"
    "# do not edit (tests check it matches the code). Change settings in a preset\n"
    "# (experiments/preset/) or in experiments/config.yaml instead.\n"
)


def defaults_text() -> str:
    """``experiments/defaults.yaml``: every setting of the typed config with its default, so
    the composed ``params.yaml`` holds every key (``dvc exp run -S train.x=…`` needs the key)."""
    from harness.config import HarnessConfig

    data = HarnessConfig(preset="defaults").to_dict()
    del data["preset"]
    return DEFAULTS_HEADER + dump_params(data)


def compose_params(root: str | Path, preset: str | None = None) -> tuple[Path, bool]:
    """Write ``params.yaml`` from ``experiments/`` (what ``dvc exp run`` would write);
    ``(path, changed)``. The result is validated before the file is touched."""
    from harness.config import validate_config

    root = Path(root)
    composition = compose(root, preset, "command line")
    validate_config(composition.data, composition.origin, CONFIG_FILE)
    path = root / "params.yaml"
    text = dump_params(composition.data)
    changed = not path.is_file() or path.read_text(encoding="utf-8") != text
    if changed:
        path.write_text(text, encoding="utf-8")
    return path, changed


def check_params(params: str | Path, root: str | Path) -> list[str]:
    """Check ``params.yaml`` for the pipeline; return notes for the user.

    DVC tracks every setting as a param of the stage that reads it, so a hand-written partial
    params.yaml gets a note saying how to compose it. A composed one that differs from
    the composition of ``experiments/`` is fine (``dvc exp run -S`` or a hand edit did that),
    but it is said, since it is also what an ``experiments/`` edit without recomposing looks like.
    """
    import json

    from harness.config import HarnessConfig, load_yaml

    user = load_yaml(params)
    if not is_composed(user):
        missing = ", ".join(sorted(set(HarnessConfig.model_fields) - set(user)))
        return [
            f"{params} holds only some settings (no {missing}): DVC sees only those, and the "
            "pipeline's stages declare every section as params; run `harness config compose` "
            "(or `dvc exp run`) to write them all from experiments/"
        ]
    preset = user.get("preset") if isinstance(user.get("preset"), str) else None
    diffs = differences(user, compose(root, preset, str(params)).data)
    if not diffs:
        return []
    shown = ", ".join(f"{k}={json.dumps(v)} (there: {json.dumps(t)})" for k, v, t in diffs[:5])
    more = f" and {len(diffs) - 5} more" if len(diffs) > 5 else ""
    notes = [
        f"params.yaml differs from experiments/ in {shown}{more} (from `dvc exp run -S` or a "
        "hand edit; after editing experiments/, run `harness config compose`)"
    ]
    space = (user.get("sweep") or {}).get("space") or {}
    for key, _, _ in diffs:
        name = key.removeprefix("train.")
        if key.startswith("train.") and name in space:
            notes.append(
                f"{key} does not change the sweep: sweep.space.{name} searches it (replace "
                f"that entry instead: dvc exp run -S '~sweep.space.{name}' "
                f"-S '+sweep.space.{name}={{choices:[...]}}')"
            )
    return notes
