"""What discovery found, as data and as text (``vramferry plan``)."""

from __future__ import annotations

from typing import Any

from ..units import format_bytes


def discovery_report(modules: Any, inventory: Any) -> dict[str, Any]:
    """What ``vramferry plan`` shows of discovery, as data: each component's role, path, class, bytes and dtype,
    the DiTs' blocks and how each list was found, and the warnings.

    Args:
        modules: a ``PipelineModules`` from ``discovery.discover``.
        inventory: the ``Inventory`` from ``planner.inventory_of(modules)``.
    """
    components = []
    for component in modules.components():
        try:
            size = inventory.get(component.name)
        except KeyError:
            size = None
        components.append(
            {
                "name": component.name,
                "role": str(component.role),
                "class": type(component.module).__name__,
                "source": component.source,
                "aliases": list(component.aliases),
                "bytes": size.bytes if size else None,
                "dtype": size.dtype if size else None,
            }
        )
    blocks = {
        dit: {
            "attrs": list(bs.attrs),
            "count": len(bs.names),
            "found_by": bs.found_by,
            "bytes": list(inventory.get(dit).block_bytes) if _has(inventory, dit) else [],
        }
        for dit, bs in [*modules.blocks.items(), *getattr(modules, "encoder_blocks", {}).items()]
    }
    return {
        "pipeline_class": modules.pipeline_class,
        "source": modules.source,
        "components": components,
        "blocks": blocks,
        "warnings": list(modules.warnings),
        "total_bytes": inventory.total_bytes,
    }


def _has(inventory: Any, name: str) -> bool:
    try:
        inventory.get(name)
    except KeyError:
        return False
    return True


_FOUND_BY = {
    "declared": "declared by the model class",
    "config": "given by block_attrs",
    "heuristic": "found by heuristic",
}


def format_discovery(data: dict[str, Any]) -> str:
    """The text form of :func:`discovery_report`."""
    lines = [f"pipeline: {data['pipeline_class']} (modules found via {data['source']})", ""]
    rows = [("role", "component", "class", "parameters", "dtype", "found by")]
    for c in data["components"]:
        size = format_bytes(c["bytes"]) if c["bytes"] is not None else "?"
        name = c["name"] + (f" (also {', '.join(c['aliases'])})" if c["aliases"] else "")
        rows.append((c["role"], name, c["class"], size, str(c["dtype"] or "?"), c["source"]))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.append(f"total: {format_bytes(data['total_bytes'])}")
    for dit, blocks in data["blocks"].items():
        sizes = blocks["bytes"]
        each = f", {format_bytes(max(sizes))} the largest" if sizes else ""
        attrs = " + ".join(blocks["attrs"])
        how = _FOUND_BY.get(blocks["found_by"], f"found by {blocks['found_by']}")
        lines.append(f"blocks of {dit}: {blocks['count']} in {attrs} ({how}{each})")
    if data["blocks"]:
        lines.append(
            "(DiT blocks stream in layerwise and auto modes; encoder blocks only in auto, when needed)"
        )
    if not data["blocks"]:
        lines.append("blocks: none found (layerwise streaming will swap whole DiTs)")
    for warning in data["warnings"]:
        lines.append(f"warning: {warning}")
    return "\n".join(lines)
