"""Head selections: parsing the ``--heads`` spec syntax and resolving it against a model.

A selection says which (layer, query head) pairs an intervention touches. Accepted forms:

* the string ``"all"`` (every head of every layer);
* a spec string of ``;``-separated groups ``LAYERS[:HEADS]``, where ``LAYERS`` and ``HEADS`` are
  ``all`` or comma-separated indices and inclusive ranges ``a-b``; a group without ``:HEADS``
  selects every head of its layers. Examples: ``"0-11"``, ``"0,2,5"``, ``"3:0,5;7:all"``,
  ``"all:0-3"`` (heads 0..3 of every layer);
* from Python/YAML/JSON: a list of layer indices, or a mapping ``{layer: None | [heads]}``
  (``None``/``"all"`` = every head; keys may be strings such as ``"3"`` or ``"0-3"``).

With grouped-query attention the head indices are *query* heads. :func:`parse_heads` checks the
syntax only; :func:`resolve_heads` also checks the indices against the model's layer and head
counts and returns ``{layer: None | sorted heads}`` with ``None`` meaning every head.
"""

from __future__ import annotations

from typing import Any, Mapping

from ..errors import ConfigError

ALL = "all"
HEADS_HELP = ('layers/heads to steer: "all", layers like "0-11" or "0,2,5", or per-layer heads like '
              '"3:0,5;7:all" (groups LAYERS[:HEADS] separated by ";")')

# Parsed form: list of (layers, heads) groups; None stands for "all".
Groups = list[tuple["list[int] | None", "list[int] | None"]]


def _indices(text: str, what: str, spec: str) -> list[int] | None:
    text = text.strip()
    if text.lower() == ALL:
        return None
    out: list[int] = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            raise ConfigError(f"heads spec {spec!r}: empty {what} index (write e.g. '0,2' or '0-3')")
        lo, sep, hi = item.partition("-")
        try:
            a = int(lo)
            b = int(hi) if sep else a
        except ValueError:
            raise ConfigError(f"heads spec {spec!r}: {what} {item!r} is not an index or a range 'a-b' "
                              f"(syntax: {HEADS_HELP})") from None
        if a < 0 or b < a:
            raise ConfigError(f"heads spec {spec!r}: bad {what} range {item!r} (need 0 <= a <= b)")
        out.extend(range(a, b + 1))
    return sorted(set(out))


def _head_list(value: Any, spec: Any) -> list[int] | None:
    if value is None or (isinstance(value, str) and value.strip().lower() == ALL):
        return None
    if isinstance(value, str):
        return _indices(value, "head", str(spec))
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if isinstance(value, (list, tuple)):
        heads = []
        for h in value:
            if isinstance(h, bool) or not isinstance(h, int) or h < 0:
                raise ConfigError(f"heads {spec!r}: head index {h!r} is not a non-negative integer")
            heads.append(h)
        if not heads:
            raise ConfigError(f"heads {spec!r}: empty head list (use null for every head)")
        return sorted(set(heads))
    raise ConfigError(f"heads {spec!r}: head selection {value!r} must be null, 'all' or a list of integers")


def parse_heads(spec: Any) -> Groups:
    """Syntax check of a head selection; returns ``[(layers | None, heads | None), ...]``."""
    if spec is None:
        return [(None, None)]
    if isinstance(spec, str):
        text = spec.strip()
        if not text:
            raise ConfigError(f"heads spec is empty (syntax: {HEADS_HELP})")
        groups: Groups = []
        for group in text.split(";"):
            if not group.strip():
                raise ConfigError(f"heads spec {spec!r}: empty group between ';' (syntax: {HEADS_HELP})")
            layers, sep, heads = group.partition(":")
            if sep and not heads.strip():
                raise ConfigError(f"heads spec {spec!r}: no heads after ':' in {group!r}")
            groups.append((_indices(layers, "layer", spec), _indices(heads, "head", spec) if sep else None))
        return groups
    if isinstance(spec, Mapping):
        if not spec:
            raise ConfigError("heads mapping is empty: give {layer: null | [heads]} or 'all'")
        groups = []
        for key, value in spec.items():
            if isinstance(key, bool):
                raise ConfigError(f"heads mapping key {key!r} is not a layer index")
            layers = [key] if isinstance(key, int) else _indices(str(key), "layer", str(spec))
            if layers is not None and any(x < 0 for x in layers):
                raise ConfigError(f"heads mapping: negative layer index {key!r}")
            groups.append((layers, _head_list(value, spec)))
        return groups
    if isinstance(spec, (list, tuple)):
        if not spec:
            raise ConfigError("heads list is empty: give layer indices or 'all'")
        layers = []
        for x in spec:
            if isinstance(x, bool) or not isinstance(x, int) or x < 0:
                raise ConfigError(f"heads list: layer {x!r} is not a non-negative integer")
            layers.append(x)
        return [(sorted(set(layers)), None)]
    raise ConfigError(f"heads must be a spec string, a list of layers or a mapping, got {type(spec).__name__}")


def resolve_heads(spec: Any, num_layers: int, num_heads: int) -> dict[int, list[int] | None]:
    """``{layer: None (every head) | sorted query heads}`` for a model with the given counts.

    Later groups add to earlier ones; indices out of range raise :class:`ConfigError`.
    """
    chosen: dict[int, set[int] | None] = {}
    for layers, heads in parse_heads(spec):
        for layer in range(num_layers) if layers is None else layers:
            if layer >= num_layers:
                raise ConfigError(f"heads {spec!r}: layer {layer} is out of range; the model has "
                                  f"{num_layers} layers (0-{num_layers - 1})")
            if heads is not None:
                bad = [h for h in heads if h >= num_heads]
                if bad:
                    raise ConfigError(f"heads {spec!r}: head {bad[0]} is out of range; the model has "
                                      f"{num_heads} query heads per layer (0-{num_heads - 1})")
            if heads is None or chosen.get(layer, set()) is None:
                chosen[layer] = None
            else:
                chosen.setdefault(layer, set()).update(heads)  # type: ignore[union-attr]
    out: dict[int, list[int] | None] = {}
    for layer in sorted(chosen):
        heads_set = chosen[layer]
        out[layer] = None if heads_set is None or len(heads_set) == num_heads else sorted(heads_set)
    return out


def format_heads(resolved: Mapping[int, list[int] | None]) -> str:
    """Spec string for a resolved selection (inverse of :func:`parse_heads` up to ordering)."""
    def ranges(xs: list[int]) -> str:
        parts, start = [], None
        for i, x in enumerate(xs):
            if start is None:
                start = x
            if i + 1 == len(xs) or xs[i + 1] != x + 1:
                parts.append(str(start) if start == x else f"{start}-{x}")
                start = None
        return ",".join(parts)

    full = [layer for layer, h in resolved.items() if h is None]
    groups = [ranges(sorted(full))] if full else []
    groups += [f"{layer}:{ranges(h)}" for layer, h in resolved.items() if h is not None]
    return ";".join(groups)
