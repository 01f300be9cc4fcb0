"""Loading a recipe: a built-in name or a YAML path, its ``base:`` chain deep-merged, ``--set`` overrides
applied, then validated once into a :class:`~nemoforge.config.Recipe` with one-line errors."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from nemoforge.config.recipe import Recipe
from nemoforge.errors import RecipeError

BASE_KEY = "base"
"""Top-level recipe key naming the recipe it extends (not a field of :class:`Recipe`: resolved on loading)."""


def builtin_recipes() -> list[str]:
    """Names of the recipes shipped with the package (bases named ``_*.yaml``, which only other recipes extend,
    are left out)."""
    files = resources.files("nemoforge.recipes").iterdir()
    return sorted(p.name.removesuffix(".yaml") for p in files if p.name.endswith(".yaml") and p.name[0] != "_")


def _is_path(name_or_path: str) -> bool:
    return Path(name_or_path).suffix in (".yaml", ".yml")


def _unshared(tree: Any) -> Any:
    """A copy of a loaded YAML tree in which no two places share one dict or list (a YAML alias loads as the
    anchored object itself: merging or ``--set`` at one place would otherwise change every alias of it)."""
    if isinstance(tree, dict):
        return {key: _unshared(value) for key, value in tree.items()}
    if isinstance(tree, list):
        return [_unshared(value) for value in tree]
    return tree


def _read_recipe_yaml(name_or_path: str) -> tuple[dict[str, Any], str]:
    if _is_path(name_or_path):
        path = Path(name_or_path)
        if not path.is_file():
            raise RecipeError(f"recipe file {name_or_path} does not exist")
        text = path.read_text()
    else:
        resource = resources.files("nemoforge.recipes") / f"{name_or_path}.yaml"
        if not resource.is_file():
            raise RecipeError(
                f"no recipe named {name_or_path!r}: give a .yaml path or one of {', '.join(builtin_recipes())}"
            )
        text = resource.read_text()
    try:
        data = yaml.safe_load(text) or {}
    except yaml.MarkedYAMLError as err:  # pyyaml's message spans lines: keep the problem and where it is
        mark = err.problem_mark
        raise RecipeError(
            f"recipe {name_or_path} is not valid YAML: {err.problem} (line {mark.line + 1}, column {mark.column + 1})"
        ) from None
    except yaml.YAMLError as err:
        raise RecipeError(f"recipe {name_or_path} is not valid YAML: {' '.join(str(err).split())}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {name_or_path} must be a YAML mapping at the top level")
    return _unshared(data), name_or_path


def merge_recipe_dicts(base: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    """``child`` over ``base``, as a new dict: mappings merge key by key (recursively); a list, a scalar or a
    ``null`` in ``child`` replaces the base's value whole."""
    merged = dict(base)
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_recipe_dicts(merged[key], value)
        else:
            merged[key] = value
    return merged


def _base_ref(base: Any, origin: str) -> tuple[str, str]:
    """Where ``base:`` of the recipe ``origin`` points: (what to read, its identity for cycle checks).

    Raises:
        RecipeError: ``base`` is not a string, or names neither a built-in recipe nor an existing file.
    """
    fix = "set base: to a built-in recipe name or a .yaml path relative to the recipe"
    if not isinstance(base, str) or not base.strip():
        raise RecipeError(f"recipe {origin}: base: expected a recipe name or a .yaml path (got {base!r}); {fix}")
    if _is_path(base):
        if not _is_path(origin):
            raise RecipeError(f"built-in recipe {origin}: base: {base} must be a built-in recipe name; {fix}")
        path = (Path(origin).parent / base).resolve()
        if not path.is_file():
            raise RecipeError(f"recipe {origin}: base: {base} does not exist (looked for {path}); {fix}")
        return str(path), str(path)
    if not (resources.files("nemoforge.recipes") / f"{base}.yaml").is_file():
        raise RecipeError(
            f"recipe {origin}: base: no built-in recipe named {base!r} (built-in: {', '.join(builtin_recipes())}); "
            f"{fix}"
        )
    return base, f"built-in {base}"


def _identity(name_or_path: str) -> str:
    return str(Path(name_or_path).resolve()) if _is_path(name_or_path) else f"built-in {name_or_path}"


def read_recipe(name_or_path: str) -> dict[str, Any]:
    """The recipe dict of a built-in name or a YAML path, its ``base:`` chain merged in (base first, each child
    over it); the result holds no ``base`` key.

    Raises:
        RecipeError: a recipe is missing or not a YAML mapping, a ``base`` is unknown, or the chain is a cycle.
    """
    chain = [_identity(name_or_path)]
    data, origin = _read_recipe_yaml(name_or_path)
    layers = [data]
    while BASE_KEY in layers[-1]:
        ref, identity = _base_ref(layers[-1].pop(BASE_KEY), origin)
        if identity in chain:
            cycle = " -> ".join([*chain, identity])
            raise RecipeError(f"recipe {name_or_path}: base: makes a cycle ({cycle}); remove base: from one of them")
        chain.append(identity)
        data, origin = _read_recipe_yaml(ref)
        layers.append(data)
    merged: dict[str, Any] = {}
    for layer in reversed(layers):
        merged = merge_recipe_dicts(merged, layer)
    return merged


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.path=value`` overrides (value parsed as YAML) to a recipe dict, in place.

    Raises:
        RecipeError: if an override has no ``=``.
    """
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise RecipeError(f"--set {item!r}: expected key.path=value, e.g. --set distill.steps=10")
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise RecipeError(f"--set {item!r}: {part} is not a section")
            node = child
        node[parts[-1]] = yaml.safe_load(raw) if raw != "" else None
    return data


REMOVED_FIELDS: dict[str, str] = {
    "seed": "one seed per recipe now: remove it, and set the top-level `seed` (every stage derives its random "
    "streams from it by name)",
}
"""Keys that a section of an older recipe may hold, with the fix the error names (at the top level, ``seed`` is
the recipe's one seed)."""


def _format_error(err: dict[str, Any]) -> str:
    loc = ".".join(str(p) for p in err["loc"] if p != "__root__") or "(recipe)"
    kind = err["type"]
    if kind == "extra_forbidden" and str(err["loc"][-1]) in REMOVED_FIELDS:
        return f"{loc}: removed; {REMOVED_FIELDS[str(err['loc'][-1])]}"
    if kind == "extra_forbidden":
        return f"{loc}: unknown key; remove it or fix its spelling (see `nemoforge run --help` for sections)"
    if kind == "missing":
        return f"{loc}: required field is missing; add it to the recipe"
    msg = err["msg"].removeprefix("Value error, ")
    if msg.startswith(f"{loc}.") or (loc == "(recipe)" and msg.split(".", 1)[0] in Recipe.model_fields):
        return msg  # the message names its own field: resources.rl.gpu_count=8: ...
    got = err.get("input")
    if kind.endswith("_type") or kind.endswith("_parsing"):
        return f"{loc}: {msg} (got {got!r}); fix the value's type"
    return f"{loc}: {msg}"


def parse_recipe(data: dict[str, Any], origin: str = "recipe") -> Recipe:
    """Validate a recipe dict.

    Raises:
        RecipeError: one line per problem, each naming the field path and the fix.
    """
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        lines = [_format_error(e) for e in err.errors()]
        raise RecipeError(f"invalid recipe {origin}: " + "; ".join(lines)) from None


def load_recipe(name_or_path: str, overrides: list[str] | None = None) -> Recipe:
    """Load a built-in recipe by name, or a YAML file by path, merge its ``base:`` chain
    (:func:`read_recipe`), and apply ``--set`` overrides.

    Raises:
        RecipeError: the recipe or a base does not exist, is not YAML, the bases form a cycle, or the merged
            recipe does not validate.
    """
    if not _is_path(name_or_path) and name_or_path.startswith("_"):
        raise RecipeError(
            f"{name_or_path} is a base that recipes extend (base: {name_or_path}), not a recipe to run; "
            f"run one of {', '.join(builtin_recipes())} or a .yaml path"
        )
    return parse_recipe(apply_overrides(read_recipe(name_or_path), overrides or []), name_or_path)
