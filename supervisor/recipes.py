"""Recipe YAML + command-line overrides -> JobSpec.

A recipe is the JobSpec written as YAML (see recipes/*.yaml). On top of it,
`--set key=value` replaces any field, nested ones included
(`--set checkpoint.interval=100`, `--set overrides.training.steps=20`), and
`--infra`, `--num-nodes`, `--spot`, `--name` work like SkyPilot's flags.
`${VAR}` in a recipe string is read from the launching environment, so a
recipe can say `bucket: ${SUPERVISE_BUCKET}` and be shared.
"""

from __future__ import annotations

import copy
import os
import re
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from supervisor.errors import SuperviseError
from supervisor.spec import JobSpec, validate

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


def resolve_path(recipe: str) -> Path:
    """A recipe file, or the name of a bundled one (`llama3_8b`)."""
    path = Path(recipe)
    if path.is_file():
        return path
    bundled = RECIPES_DIR / f"{recipe.removesuffix('.yaml')}.yaml"
    if bundled.is_file():
        return bundled
    names = ", ".join(sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")))
    raise SuperviseError(f"recipe {recipe!r} not found; give a YAML file or one of: {names}")


def load_recipe(recipe: str) -> dict[str, Any]:
    path = resolve_path(recipe)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise SuperviseError(f"recipe {path}: not valid YAML ({err}); fix the file") from None
    if not isinstance(data, dict):
        raise SuperviseError(f"recipe {path}: expected a mapping of fields at the top level")
    data.setdefault("name", path.stem.replace("_", "-"))
    return data


def build_spec(recipe: str, *, sets: list[str] = (), name: str | None = None, infra: str | None = None,
               num_nodes: int | None = None, spot: bool | None = None) -> JobSpec:
    """Recipe + overrides -> validated JobSpec (flags win over --set, --set over the file)."""
    data = load_recipe(recipe)
    for item in sets:
        key, value = parse_set(item)
        apply_set(data, key, value)
    flags = {"name": name, "resources.infra": infra, "resources.num_nodes": num_nodes, "resources.spot": spot}
    for key, value in flags.items():
        if value is not None:
            apply_set(data, key, value)
    return validate(expand_vars(data))


def parse_set(item: str) -> tuple[str, Any]:
    """`key=value`; the value is read as YAML (numbers, booleans, lists), else kept as text."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise SuperviseError(f"--set {item!r}: write it as key=value, e.g. --set checkpoint.interval=100")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, dict) or value is None and raw.strip() not in ("null", "~"):
        value = raw  # "a: b" or odd text stays the literal string the user typed
    return key, value


def apply_set(data: dict[str, Any], key: str, value: Any) -> None:
    """Put `value` at dotted `key`, following JobSpec's shape (dict fields take the rest as one key)."""
    parts = key.split(".")
    model: type[BaseModel] = JobSpec
    node = data
    for i, part in enumerate(parts):
        field = model.model_fields.get(part)
        if field is None:
            known = ", ".join(sorted(model.model_fields))
            where = ".".join(parts[:i]) or "the recipe"
            raise SuperviseError(f"--set {key}: unknown field {part!r} in {where}; use one of: {known}")
        rest = parts[i + 1:]
        sub = _model_of(field.annotation)
        if not rest:
            node[part] = copy.deepcopy(value)
            return
        if sub is not None:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node, model = node[part], sub
            continue
        if _is_dict(field.annotation):
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node[part][".".join(rest)] = copy.deepcopy(value)
            return
        raise SuperviseError(f"--set {key}: {'.'.join(parts[:i + 1])} is a single value, not a section")


def _model_of(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _is_dict(annotation: Any) -> bool:
    return any(a is dict for a in (typing.get_origin(annotation), *map(typing.get_origin, typing.get_args(annotation))))


def expand_vars(value: Any, where: str = "") -> Any:
    """Replace `${VAR}` in strings with the launching environment's value."""
    if isinstance(value, dict):
        return {k: expand_vars(v, f"{where}.{k}" if where else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_vars(v, where) for v in value]
    if isinstance(value, str):
        def sub(m: re.Match) -> str:
            if m[1] not in os.environ:
                raise SuperviseError(f"field {where!r}: ${{{m[1]}}} is not set; "
                                     f"export {m[1]}=... or pass --set {where}=...")
            return os.environ[m[1]]
        return _VAR.sub(sub, value)
    return value
