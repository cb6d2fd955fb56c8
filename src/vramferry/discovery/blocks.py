"""A component's repeated blocks: declared by its class, named in the config, or found by structure."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from .paths import _MISSING, _resolve
from .sizes import has_tensors as _has_tensors
from .sizes import param_bytes

#: Class attributes a DiT may define to name its block lists, in order of precedence. The last one is
#: vLLM-Omni's deprecated single-string form.
BLOCK_CLASS_ATTRS = (
    "_offload_block_attrs",
    "_layerwise_offload_blocks_attrs",
    "_layerwise_offload_blocks_attr",
)


@dataclass(frozen=True)
class BlockSet:
    """A component's repeated blocks (a DiT's, or a text encoder's layers), in execution order.

    Attributes:
        dit: the owning component's name (a DiT, or an encoder for :attr:`PipelineModules.encoder_blocks`).
        attrs: the attributes of the component that hold the blocks, in order (``("transformer_blocks",
            "single_transformer_blocks")``). A name given through a property is replaced by the registered
            module path it resolves to; ``""`` means the component itself is the list.
        names: each block's path inside the component (``"transformer_blocks.0"``), as ``named_modules`` spells
            it.
        blocks: the block modules.
        found_by: ``"declared"`` (a class attribute on the component), ``"config"``
            (``OffloadConfig.block_attrs``, DiTs only), or ``"heuristic"``.
    """

    dit: str
    attrs: tuple[str, ...]
    names: tuple[str, ...]
    blocks: tuple[nn.Module, ...] = field(repr=False, compare=False)
    found_by: str


class _BlockError(Exception):
    pass


_BLOCK_CONTAINERS = (nn.ModuleList, nn.Sequential, nn.ModuleDict)


def _module_lists(dit: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(path, m) for path, m in dit.named_modules() if isinstance(m, _BLOCK_CONTAINERS)]


def _describe_lists(dit: nn.Module) -> str:
    """The outermost ``ModuleList``s of ``dit`` (the inner ones live inside blocks), for messages."""
    described, outer = [], []
    for path, lst in _module_lists(dit):  # parents come before their children
        if any(o == "" or path.startswith(o + ".") for o in outer):
            continue
        outer.append(path)
        classes = sorted({type(m).__name__ for m in lst.children()})
        described.append(f"{path or '<the DiT itself>'} ({len(lst)} x {'/'.join(classes) or 'nothing'})")
    return ", ".join(described[:12]) or "none"


def _blocks_from_attrs(
    dit: nn.Module, attrs: tuple[str, ...]
) -> tuple[tuple[str, ...], list[tuple[str, nn.Module]]]:
    """Blocks named by attribute paths of ``dit``; raises ``_BlockError`` saying what is wrong."""
    paths = {id(m): p for p, m in dit.named_modules()}
    real_attrs, blocks, seen = [], [], set()
    for attr in attrs:
        value, problem, _ = (dit, "", []) if attr == "" else _resolve(dit, attr)
        if value is _MISSING or value is None:
            raise _BlockError(
                f"'{attr}' is {'None' if value is None else 'missing'}{f' ({problem})' if problem else ''}"
            )
        if not isinstance(value, nn.Module):
            raise _BlockError(f"'{attr}' is a {type(value).__name__}, not an nn.ModuleList")
        is_list = isinstance(value, (nn.ModuleList, nn.Sequential, nn.ModuleDict))
        items = list(value.children()) if is_list else [value]
        if not items:
            raise _BlockError(f"'{attr}' holds no blocks")
        real_attrs.append(paths.get(id(value), attr))
        for block in items:
            if id(block) not in paths:
                raise _BlockError(
                    f"a block of '{attr}' is not a registered submodule of {type(dit).__name__}"
                )
            if id(block) in seen:
                raise _BlockError(f"a block of '{attr}' is listed twice")
            seen.add(id(block))
            blocks.append((paths[id(block)], block))
    return tuple(real_attrs), blocks


def _declared_block_attrs(dit: nn.Module) -> tuple[str, tuple[str, ...]] | None:
    for attr in BLOCK_CLASS_ATTRS:
        value = getattr(type(dit), attr, None)
        if value:
            return attr, ((value,) if isinstance(value, str) else tuple(value))
    return None


def _block_class(container: nn.Module, children: list[nn.Module]) -> str | None:
    """The class of the repeated blocks among a container's children: the class of at least two thirds of them
    (a minority of odd blocks, such as a last block of another class, is tolerated); ``None`` when there is
    none. In an ``nn.Sequential`` the blocks must be composite modules: a Sequential of single layers is an MLP,
    not a stack of blocks."""
    if not children:
        return None
    counts: dict[type, int] = {}
    for child in children:
        counts[type(child)] = counts.get(type(child), 0) + 1
    cls, count = max(counts.items(), key=lambda item: item[1])
    if count * 3 < 2 * len(children):
        return None
    example = next(child for child in children if type(child) is cls)
    if isinstance(container, nn.Sequential) and not any(True for _ in example.children()):
        return None
    return cls.__name__


def _heuristic_blocks(dit: nn.Module) -> tuple[tuple[str, ...], list[tuple[str, nn.Module]]] | None:
    """The containers (``ModuleList``, ``Sequential``, ``ModuleDict``) of one block class, with at most a
    minority of others, that hold the DiT's repeated blocks, in definition order."""
    candidates = []
    for index, (path, lst) in enumerate(_module_lists(dit)):
        children = list(lst.children())
        cls = _block_class(lst, children) if _has_tensors(lst) else None
        if cls is not None:
            candidates.append((index, path, lst, cls))
    if not candidates:
        return None

    def outermost(chosen: list) -> list:
        return [
            c
            for c in chosen
            if not any(c[1].startswith(o[1] + ".") or (o[1] == "" and c[1]) for o in chosen if o is not c)
        ]

    chosen = []
    for attr in ("_repeated_blocks", "_no_split_modules"):
        preferred = set(getattr(type(dit), attr, None) or ())
        chosen = outermost([c for c in candidates if c[3] in preferred])
        if chosen:
            break
    if not chosen:
        chosen = outermost(candidates)
        sizes = {id(c[2]): param_bytes(c[2]) for c in chosen}
        largest = max(sizes.values())
        chosen = [c for c in chosen if sizes[id(c[2])] >= largest / 10]  # drop small refiners and heads
        if sum(sizes[id(c[2])] for c in chosen) * 2 < param_bytes(dit):
            return None  # the lists do not hold most of the DiT: they are not its backbone
    chosen.sort(key=lambda c: c[0])  # named_modules order = definition order = execution order
    return _blocks_from_attrs(dit, tuple(c[1] for c in chosen))


def _blockset(name: str, module: nn.Module, attrs: tuple[str, ...], found_by: str) -> BlockSet:
    paths, blocks = _blocks_from_attrs(module, attrs)
    return BlockSet(name, paths, tuple(p for p, _ in blocks), tuple(b for _, b in blocks), found_by)


def _structural_blocks(
    name: str, module: nn.Module, kind: str, warn: Callable[[str], None] | None
) -> BlockSet | None:
    """Blocks named by a class attribute of ``module``, else found by the heuristic; ``None`` if neither."""
    declared = _declared_block_attrs(module)
    if declared is not None:
        attr, attrs = declared
        try:
            return _blockset(name, module, attrs, "declared")
        except _BlockError as exc:
            if warn is not None:
                warn(
                    f"{kind} '{name}' declares {type(module).__name__}.{attr} = {list(attrs)!r}, but {exc}; looking "
                    f"for its blocks by structure instead. Its ModuleLists: {_describe_lists(module)}."
                )
    try:
        found = _heuristic_blocks(module)
    except _BlockError:  # nothing usable: the lists found are not registered the way named_modules says
        return None
    if found is None:
        return None
    return BlockSet(name, found[0], tuple(p for p, _ in found[1]), tuple(b for _, b in found[1]), "heuristic")


def find_encoder_blocks(
    name: str, encoder: nn.Module, warn: Callable[[str], None] | None = None
) -> BlockSet | None:
    """An encoder's repeated layers in execution order, or ``None`` when it shows none (no warning then).

    A class attribute names them as for a DiT (``_offload_block_attrs``); otherwise the DiT heuristic finds
    them: the outermost same-class ``nn.ModuleList``s of the model's ``_no_split_modules`` classes (T5's and
    UMT5's ``encoder.block``, CLIP's ``encoder.layers``, Gemma's and Qwen2's ``layers``, Qwen2.5-VL's
    ``visual.blocks`` then ``language_model.layers``), else the lists holding most of its weights. Pure and
    quick: it walks the module tree and moves nothing.

    Args:
        name: the encoder's component name, recorded in the :class:`BlockSet`.
        encoder: the encoder module.
        warn: called with a message when a class declaration names blocks that do not exist.
    """
    return _structural_blocks(name, encoder, "encoder", warn)
