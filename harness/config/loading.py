"""Loading: strict YAML, the preset/params/command-line merge with the origin of every key,
validation into :class:`HarnessConfig` with errors that name the file and key, and ``-S``
overrides."""

from __future__ import annotations

import contextlib
import difflib
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from harness.compose import record_origin, replace_origin
from harness.config._base import ConfigError, _KeysError
from harness.config.schema import HarnessConfig

DEFAULT_PARAMS = "params.yaml"


class DuplicateKeyError(yaml.YAMLError):
    """A mapping that names a key twice (PyYAML would silently keep the last one)."""

    def __init__(self, key: str, line: int, first: int) -> None:
        super().__init__(f"duplicate key {key!r} at line {line} (first at line {first})")
        self.key, self.line, self.first = key, line, first


class _YamlLoader(yaml.SafeLoader):
    """Safe loader that also reads ``1e-4`` as a float (YAML 1.1 would give a string) and
    refuses a key given twice in one mapping, as DVC's own YAML reader does: PyYAML keeps the
    last, so a second ``train:`` block appended to params.yaml replaced the whole section."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if isinstance(key, str | int | float | bool) and key in seen:
                raise DuplicateKeyError(str(key), line, seen[key])
            seen.setdefault(key, line)
        return super().construct_mapping(node, deep=deep)


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping (safe loader); errors name the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"{path}: file not found"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})"]) from None
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {(exc.strerror or str(exc)).lower()}"]) from None
    try:
        data = yaml.load(text, Loader=_YamlLoader)  # noqa: S506 - _YamlLoader is a SafeLoader
    except DuplicateKeyError as exc:
        raise ConfigError(
            [
                f"{path}:{exc.line}: duplicate key {exc.key!r} (first at line {exc.first}); merge the two"
            ]
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError([_yaml_problem(path, text, exc)]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: top level must be a mapping, got {type(data).__name__}"])
    return data


def _yaml_problem(path: Path, text: str, exc: yaml.YAMLError) -> str:
    """One line ``<file>:<line>:<col>: invalid YAML: <problem>`` (1-based, as editors count).

    PyYAML's own text spans several lines and names ``<unicode string>`` (it parsed a string,
    not the file), so each line would print as its own ``error:`` with no usable position.
    """
    where, problem = "", str(exc)
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        where = f":{mark.line + 1}:{mark.column + 1}"
        problem = exc.problem or exc.context or "syntax error"
        if exc.problem and exc.context and exc.context_mark is not None:
            # "expected ']'" at the end of the file is only clear with where the list began.
            start = exc.context_mark
            problem += f" ({exc.context} at line {start.line + 1}, column {start.column + 1})"
    elif isinstance(exc, yaml.reader.ReaderError):
        # A character the YAML reader refuses carries an offset into the text, not a mark.
        lines = text[: exc.position].split("\n")
        where = f":{len(lines)}:{len(lines[-1]) + 1}"
        char = f"#x{exc.character:04x}" if isinstance(exc.character, int) else repr(exc.character)
        problem = f"unacceptable character {char}: {exc.reason}"
    return f"{path}{where}: invalid YAML: {' '.join(problem.split())}"


def available_presets(root: str | Path = ".") -> list[str]:
    """Names of the presets in ``<root>/experiments/preset``."""
    from harness.compose import available_presets as names

    return names(root)


# Mappings whose values are whole specs ("*" matches any key): a later file replaces such a value
# as a unit instead of merging keys into it, so a ``{choices: [...]}`` entry in params.yaml does not
# inherit the preset's ``low``/``high`` and a user's ``weights`` do not keep the preset's keys.
ATOMIC_PATHS: tuple[tuple[str, ...], ...] = (
    ("sweep", "space", "*"),
    ("sweep", "weights"),
    ("sweep", "evaluation"),
)


class _Dotted(dict[str, Any]):
    """A mapping that :func:`parse_override` built from the dots of a key (``sweep.weights`` of
    ``-S sweep.weights.dino=0.7``), not one the user wrote as a value (``-S 'sweep.weights={dino:
    0.7}'``): :func:`_merge` merges it even at an :data:`ATOMIC_PATHS` path, so a dotted key
    sets one leaf, as Hydra's and ``dvc exp run -S`` do. Never left in a merged config
    (:func:`_undotted`): yaml.safe_dump cannot write a dict subclass."""


class _Whole(dict[str, Any]):
    """A mapping that replaces the config's mapping as a whole wherever it is merged: what
    ``-S`` sets after deleting the key (``-S '~sweep.space.dropout' -S
    '+sweep.space.dropout={choices:[0.0]}'``), as Hydra's and ``dvc exp run -S``'s ``~``/``+``."""


class _Deleted:
    """The value of ``-S '~key'``: :func:`_merge` keeps it, :func:`_undotted` drops the key."""

    def __repr__(self) -> str:
        return "<deleted>"


_DELETED = _Deleted()


def _undotted(value: Any) -> Any:
    """``value`` with every mapping a plain ``dict`` (no :class:`_Dotted` or :class:`_Whole`
    marker left) and every key deleted by ``-S '~key'`` gone."""
    if isinstance(value, dict):
        return {key: _undotted(sub) for key, sub in value.items() if sub is not _DELETED}
    return value


def _is_atomic(path: tuple[str, ...]) -> bool:
    return any(
        len(pattern) == len(path) and all(p in ("*", k) for p, k in zip(pattern, path, strict=True))
        for pattern in ATOMIC_PATHS
    )


def _merge(
    base: Mapping[str, Any],
    override: Mapping[str, Any],
    origin: dict[tuple[str, ...], str],
    source: str,
    prefix: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Deep-merge ``override`` into a copy of ``base``, recording which file set each key.

    Mappings merge key by key, except at :data:`ATOMIC_PATHS` where only a :class:`_Dotted`
    one (from a dotted ``-S`` key) merges; anything else (lists included) is replaced; a
    :class:`_Whole` one always replaces. A ``_Dotted`` or ``_Whole`` base stays one, so
    :func:`combine_overrides` keeps the marks for the config.
    """
    out: dict[str, Any] = type(base)(base) if isinstance(base, _Dotted | _Whole) else dict(base)
    for key, value in override.items():
        path = (*prefix, str(key))
        here = out.get(key)
        if here is _DELETED and isinstance(value, Mapping):
            value = _Whole(_undotted(value))  # set after a deletion: no old key survives
        if (
            isinstance(value, Mapping)
            and isinstance(here, Mapping)
            and not isinstance(value, _Whole)
            and (isinstance(value, _Dotted) or not _is_atomic(path))
        ):
            out[key] = _merge(here, value, origin, source, path)
        else:
            out[key] = value
            replace_origin(origin, value, source, path)
    return out


def _source_of(
    loc: tuple[str, ...],
    origin: Mapping[tuple[str, ...], str],
    default: str,
    keys: tuple[str, ...] = (),
) -> str:
    """The file to blame for an error at ``loc``.

    The latest-applied source among the keys at or under ``loc`` (for a section-level check,
    the keys it names in ``keys``, dotted and relative to ``loc``, when any file set them):
    ``origin`` is in application order, so the last hit has the highest priority. An error
    below anything a file set (a missing key, a union member) goes to the nearest parent a file
    set; with no file at all, ``default``.
    """
    named = [(*loc, *key.split(".")) for key in keys]
    for targets in (named, [loc]):
        hits = [src for path, src in origin.items() if any(path[: len(t)] == t for t in targets)]
        if hits:
            return hits[-1]
    for n in range(len(loc) - 1, 0, -1):
        if loc[:n] in origin:
            return origin[loc[:n]]
    return default


def _describe(err: Mapping[str, Any], siblings: list[str]) -> str:
    """Turn one pydantic error into a short human sentence."""
    kind, ctx, got = err["type"], err.get("ctx") or {}, err.get("input")
    bounds = {
        "greater_than_equal": (">=", "ge"),
        "greater_than": (">", "gt"),
        "less_than_equal": ("<=", "le"),
        "less_than": ("<", "lt"),
    }
    if kind in bounds:
        op, key = bounds[kind]
        return f"must be {op} {ctx[key]}, got {got!r}"
    if kind == "extra_forbidden":
        name = str(err["loc"][-1])
        close = difflib.get_close_matches(name, siblings, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return f"unknown key{hint}; allowed: {', '.join(sorted(siblings))}"
    if kind == "missing":
        return "required key is missing"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected')}, got {got!r}"
    if kind.endswith("_type") or kind.endswith("_parsing"):
        expected = kind.removesuffix("_type").removesuffix("_parsing")
        return f"expected {expected}, got {type(got).__name__} {got!r}"
    if kind == "value_error":
        return str(ctx.get("error", err["msg"]))
    return f"{err['msg']}, got {got!r}"


def _fields_at(loc: tuple[str, ...]) -> list[str]:
    """Allowed keys of the section that contains ``loc[-1]``."""
    model: type[BaseModel] = HarnessConfig
    parts = iter(loc[:-1])
    for part in parts:
        field = model.model_fields.get(part)
        found = _model_in(field.annotation) if field else None
        if found is None:
            return []
        # ``sweep.space.<name>``, ``sweep.evaluation.rungs.<index>``: after a dict or list
        # field the next part is a key or an index into it, not a field of the item's model.
        if field is not None and _is_container(field.annotation) and next(parts, None) is None:
            return []
        model = found
    return list(model.model_fields)


def _is_container(annotation: Any) -> bool:
    """Whether an annotation is a dict or list (or an optional / annotated one)."""
    origin = get_origin(annotation)
    if origin in (dict, list, tuple):
        return True
    if origin is Annotated:
        return _is_container(get_args(annotation)[0])
    if origin in (Union, UnionType):  # ``list[X] | None``
        return any(_is_container(member) for member in get_args(annotation))
    return False


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The config section an annotation holds: itself, or the section member of a union
    (``sweep.evaluation``)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def validate_config(
    data: Mapping[str, Any],
    origin: Mapping[tuple[str, ...], str] | None = None,
    default_source: str = DEFAULT_PARAMS,
) -> HarnessConfig:
    """Validate a merged config mapping; raise :class:`ConfigError` naming file and key path."""
    try:
        return HarnessConfig.model_validate(dict(data))
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = tuple(str(p) for p in err["loc"] if not str(p).startswith("<"))
            cause = (err.get("ctx") or {}).get("error")
            keys = cause.keys if isinstance(cause, _KeysError) else ()
            src = _source_of(loc, origin or {}, default_source, keys)
            where = ".".join(loc) if loc else ", ".join(keys) or "(top level)"
            problems.append(f"{src}: {where}: {_describe(err, _fields_at(loc))}")
        raise ConfigError(problems) from None


def load_config(
    params: str | Path = DEFAULT_PARAMS,
    overrides: Mapping[str, Any] | None = None,
    root: str | Path | None = None,
) -> HarnessConfig:
    """Load ``params.yaml``, then validate strictly.

    A composed ``params.yaml`` (every section, as ``dvc exp run`` or ``harness config compose``
    writes it) is the whole config and is used as is. A hand-written one with only ``preset:``
    and a few keys is merged over the composition of ``experiments/`` with that preset. ``-S
    preset=<name>`` recomposes from ``experiments/`` (params.yaml is then not read), as ``dvc exp
    run -S preset=<name>`` does. Other overrides apply last.

    Args:
        params: path of the params file.
        overrides: extra nested overrides applied last (e.g. from ``-S`` style CLI options).
        root: project root holding ``experiments/``; defaults to the params file's folder.

    Raises:
        ConfigError: with one line per problem, each naming the file and the dotted key path.
    """
    from harness.compose import compose, is_composed

    params = Path(params)
    root = Path(root) if root is not None else params.parent
    user = load_yaml(params)
    switching = bool(overrides) and "preset" in (overrides or {})
    preset, source = (overrides or {}).get("preset"), "command line"
    if not switching:
        preset, source = user.get("preset"), str(params)
    if preset is _DELETED:
        raise ConfigError([f"{source}: ~preset: a preset cannot be deleted; -S preset=<name>"])
    if preset is not None and not isinstance(preset, str):
        raise ConfigError([f"{source}: preset: expected str, got {type(preset).__name__}"])
    composition = compose(root, preset, source)
    merged, origin = composition.data, composition.origin
    if not (switching and is_composed(user)):
        # A partial params.yaml keeps its overrides across a preset switch; a composed one
        # belongs to the preset it was composed with.
        user = {k: v for k, v in user.items() if not (switching and k == "preset")}
        merged, origin = _apply_params(merged, origin, user, str(params))
    if overrides:
        merged = _undotted(_merge(merged, overrides, origin, "command line"))
    return validate_config(merged, origin, str(params))


_MISSING = object()


def _value_at(data: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(data, Mapping) or key not in data:
            return _MISSING
        data = data[key]
    return data


def _apply_params(
    base: dict[str, Any],
    origin: dict[tuple[str, ...], str],
    user: dict[str, Any],
    label: str,
) -> tuple[dict[str, Any], dict[tuple[str, ...], str]]:
    """``params.yaml`` applied to the composition of ``experiments/``: ``(config, origin)``.

    A composed params.yaml replaces the composition (a key deleted from it stays deleted); its
    keys that still equal the composition keep their experiments/ file as origin, so an error
    in a preset's value names the preset. A partial one is merged over the composition.
    """
    from harness.compose import is_composed

    if not is_composed(user):
        return _merge(base, user, origin, label), origin
    mine: dict[tuple[str, ...], str] = {}
    record_origin(mine, user, label, ())
    same = {
        path: src
        for path, src in origin.items()
        if path in mine and _identical(_value_at(user, path), _value_at(base, path))
    }
    # Differing keys come last: in `origin` the last hit is the highest-priority source.
    return dict(user), {**same, **{p: label for p in mine if p not in same}}


def _identical(a: Any, b: Any) -> bool:
    """Equal and of the same types throughout: ``4.0 == 4`` and ``0 == False`` in Python, but a
    params.yaml value of another type is the user's edit, not the preset's value."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_identical(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_identical(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


def _override_value(item: str, raw: str) -> Any:
    """The value of ``-S`` ``item``: a mapping or list (``{...}``, ``[...]``) as Hydra's override
    grammar reads it, so that ``harness -S`` means what ``dvc exp run -S`` means (YAML reads
    ``{dino:0.7}`` as the key ``dino:0.7``, Hydra as ``{"dino": 0.7}``); anything else, or a
    value that grammar refuses (a prompt with unquoted braces), as YAML."""
    if raw.lstrip()[:1] in ("{", "["):
        from hydra.core.override_parser.overrides_parser import OverridesParser
        from hydra.errors import HydraException

        with contextlib.suppress(HydraException):
            return OverridesParser.create().parse_override(f"value={raw}").value()
    try:
        return yaml.load(raw, Loader=_YamlLoader)  # noqa: S506 - _YamlLoader is a SafeLoader
    except yaml.YAMLError as exc:
        problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
        raise ConfigError([f"command line: {item!r}: invalid YAML value ({problem})"]) from None


def parse_override(item: str) -> dict[str, Any]:
    """Turn ``train.rank=8`` into ``{"train": {"rank": 8}}`` (the value: :func:`_override_value`).

    Hydra's prefixes, as ``dvc exp run -S`` takes them: ``~key`` deletes the key (a
    ``sweep.space`` entry: no longer searched; a setting: back to its default), ``+key=value``
    and ``++key=value`` set it as ``key=value`` does.
    """
    if item.startswith("~"):
        if "=" in item:
            raise ConfigError([f"command line: {item!r}: write ~KEY, without a value"])
        key, value = item[1:], _DELETED
    elif "=" not in item:
        raise ConfigError([f"command line: {item!r}: expected KEY=VALUE"])
    else:
        key, raw = item.lstrip("+").split("=", 1)
        value = _override_value(item, raw)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError([f"command line: {item!r}: empty key"])
    # The mappings made from the dots are marked: below an atomic path (``sweep.weights.dino``)
    # they set one key, where a mapping written as the value replaces the whole entry.
    out: dict[str, Any] = {parts[-1]: value}
    for part in reversed(parts[:-1]):
        out = {part: _Dotted(out)}
    return out


def combine_overrides(items: Sequence[str]) -> dict[str, Any]:
    """Several ``-S`` items as one ``overrides`` mapping for :func:`load_config`, each applied
    after the ones before as :func:`load_config` applies them to the config: a later mapping
    written whole (``sweep.weights={dino: 1}``) replaces what an earlier dotted key set there,
    and dotted keys of one mapping (``sweep.weights.dino=.7``, ``sweep.weights.clip_t=.3``)
    combine and still merge into the preset's mapping."""
    combined: dict[str, Any] = {}
    for item in items:
        combined = _merge(combined, parse_override(item), {}, "command line")
    return combined
