"""Attribute paths into nested pipeline objects (``"pipe.transformer"``)."""

from __future__ import annotations


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


_MISSING = _Missing()


def _resolve(root: object, path: str) -> tuple[object, str, list[tuple[str, object]]]:
    """Read ``path`` (dotted) from ``root``, attribute by attribute, never raising.

    Returns:
        ``(value, problem, steps)``: ``value`` is ``_MISSING`` when the path cannot be read and ``problem`` then
        says why (the exception text of an attribute access that raised); ``steps`` holds ``(prefix, object)``
        for every intermediate object passed through.
    """
    parts = path.split(".") if isinstance(path, str) else []
    if not parts or not all(parts):
        return _MISSING, f"{path!r} is not an attribute path", []
    obj, steps = root, []
    for i, part in enumerate(parts):
        if i:
            prefix = ".".join(parts[:i])
            if obj is None:
                return _MISSING, f"'{prefix}' is None", steps
            steps.append((prefix, obj))
        try:
            obj = getattr(obj, part)
        except Exception as exc:  # a raising property counts as missing; the text goes into the warning
            where = ".".join(parts[:i]) or type(root).__name__
            return _MISSING, f"reading '{part}' of '{where}' raised {type(exc).__name__}: {exc}", steps
    return obj, "", steps
