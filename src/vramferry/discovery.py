"""Find a pipeline's modules and their roles: the protocol, else diffusers' components, else a name scan.

Discovery is pure: it reads attributes and walks module trees, moves nothing, makes no CUDA calls, and works on
meta-device modules. diffusers and transformers are never imported here: a pipeline or module can only be an
instance of their classes once the caller has imported them, so their classes are looked up in ``sys.modules``.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum

from torch import nn

from .errors import DiscoveryError
from .protocol import declares_offload
from .sizes import dominant_dtype as dominant_dtype  # re-exported: part of discovery's API
from .sizes import has_tensors as _has_tensors
from .sizes import own_tensor_bytes as _own_tensor_bytes
from .sizes import param_bytes

logger = logging.getLogger(__name__)

#: Attribute names scanned when a pipeline neither declares the protocol nor is a diffusers pipeline.
DIT_SCAN_NAMES = (
    "transformer",
    "transformer_2",
    "dit",
    "sr_dit",
    "language_model",
    "transformer_blocks",
    "model",
    "unet",
)
ENCODER_SCAN_NAMES = ("text_encoder", "text_encoder_2", "text_encoder_3", "image_encoder", "mllm")
VAE_SCAN_NAMES = ("vae", "audio_vae")

#: Class attributes a DiT may define to name its block lists, in order of precedence. The last one is
#: vLLM-Omni's deprecated single-string form.
BLOCK_CLASS_ATTRS = (
    "_offload_block_attrs",
    "_layerwise_offload_blocks_attrs",
    "_layerwise_offload_blocks_attr",
)

_DECLARED_LISTS = (
    ("_dit_modules", "dit"),
    ("_encoder_modules", "encoder"),
    ("_vae_modules", "vae"),
    ("_resident_modules", "resident"),
)
# Pretrained transformers models that run after decoding, not as encoders.
_POSTPROCESSOR_NAMES = ("safety_checker", "watermark", "vocoder")


class Role(str, Enum):
    DIT = "dit"
    ENCODER = "encoder"
    VAE = "vae"
    RESIDENT = "resident"
    OTHER = "other"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Component:
    """One collected module.

    Attributes:
        name: the attribute path it was found under (``"transformer"``, ``"language_model.model"``).
        module: the module itself.
        role: its role.
        source: how it was found: ``"declared"``, ``"components"`` (diffusers), ``"scan"`` or ``"others"``.
        aliases: other paths that reach the same module (collected once).
        absorbed: paths of collected-looking modules nested inside this one (the outermost owns them).
    """

    name: str
    module: nn.Module = field(repr=False, compare=False)
    role: Role
    source: str
    aliases: tuple[str, ...] = ()
    absorbed: tuple[str, ...] = ()


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


@dataclass
class PipelineModules:
    """What discovery found. Every module of the pipeline that owns weights sits in exactly one list.

    Attributes:
        pipeline_class: the pipeline's class name, for messages.
        source: ``"protocol"``, ``"diffusers"`` or ``"scan"``.
        dits, encoders, vaes, resident, others: the components by role, in declaration/pipeline order.
        blocks: per DiT name, its blocks (absent for a DiT without repeated blocks).
        encoder_blocks: per encoder name, its repeated layers (T5's ``encoder.block``, CLIP's
            ``encoder.layers``, a VLM's ``visual.blocks`` and ``language_model.layers``); absent for an encoder
            without them. The planner may stream them when an encoder does not fit whole.
        warnings: every warning discovery emitted, in order.
    """

    pipeline_class: str
    source: str
    dits: list[Component] = field(default_factory=list)
    encoders: list[Component] = field(default_factory=list)
    vaes: list[Component] = field(default_factory=list)
    resident: list[Component] = field(default_factory=list)
    others: list[Component] = field(default_factory=list)
    blocks: dict[str, BlockSet] = field(default_factory=dict)
    encoder_blocks: dict[str, BlockSet] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def components(self) -> list[Component]:
        """All components: dits, encoders, vaes, resident, others."""
        return [*self.dits, *self.encoders, *self.vaes, *self.resident, *self.others]

    def get(self, name: str) -> Component:
        for component in self.components():
            if component.name == name or name in component.aliases:
                return component
        raise KeyError(name)

    def by_role(self, role: Role | str) -> list[Component]:
        """The components of one role (``"dit"``, ``"encoder"``, ``"vae"``, ``"resident"``, ``"other"``)."""
        role = Role(role)
        return [c for c in self.components() if c.role is role]

    def blocks_of(self, name: str) -> BlockSet | None:
        """The blocks of the component called ``name``: a DiT's from :attr:`blocks`, an encoder's from
        :attr:`encoder_blocks`.

        An encoder absent from :attr:`encoder_blocks` gets the blocks :func:`find_encoder_blocks` finds, so a
        ``PipelineModules`` assembled without :func:`discover` (the built-in architectures') plans and runs
        like a discovered one; for a discovered pipeline that finds what discovery found.
        """
        if name in self.blocks:
            return self.blocks[name]
        if name in self.encoder_blocks:
            return self.encoder_blocks[name]
        component = next((c for c in self.encoders if c.name == name), None)
        return find_encoder_blocks(name, component.module) if component is not None else None


# ------------------------------------------------------------------------------------------ attribute paths


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


def _loaded_class(module_name: str, class_name: str) -> type | None:
    """A class from an already imported module. An instance of it cannot exist unless its module is loaded."""
    module = sys.modules.get(module_name)
    return getattr(module, class_name, None) if module is not None else None


def _is_instance(obj: object, module_name: str, class_name: str) -> bool:
    cls = _loaded_class(module_name, class_name)
    return cls is not None and isinstance(obj, cls)


def _is_diffusion_pipeline(pipeline: object) -> bool:
    return _is_instance(pipeline, "diffusers.pipelines.pipeline_utils", "DiffusionPipeline")


def _attribute_items(obj: object) -> list[tuple[str, object]]:
    """An object's registered children (for an ``nn.Module``) and instance attributes, without properties."""
    items: list[tuple[str, object]] = list(obj.named_children()) if isinstance(obj, nn.Module) else []
    try:
        items += list(vars(obj).items())
    except TypeError:  # no __dict__ (__slots__ or a builtin)
        pass
    return items


# ----------------------------------------------------------------------------------------------- collector


@dataclass(eq=False)
class _Entry:
    name: str
    module: nn.Module
    role: Role
    source: str
    aliases: list[str] = field(default_factory=list)
    absorbed: list[str] = field(default_factory=list)

    def freeze(self) -> Component:
        return Component(
            self.name, self.module, self.role, self.source, tuple(self.aliases), tuple(self.absorbed)
        )


class _Collector:
    """The mutable state of one ``discover`` call."""

    def __init__(self, pipeline: object, strict: bool) -> None:
        self.pipeline = pipeline
        self.cls = type(pipeline).__name__
        self.strict = strict
        self.source = ""
        self.warnings: list[str] = []
        self.entries: list[_Entry] = []
        self.by_id: dict[int, _Entry] = {}
        self.covered: set[int] = set()
        self.looked_at: list[str] = []
        self.wrappers: list[tuple[str, object]] = []

    def warn(self, message: str) -> None:
        if self.strict:
            raise DiscoveryError(f"{message} (strict discovery turns this warning into an error)")
        logger.warning(message)
        self.warnings.append(message)

    def add(self, name: str, module: nn.Module, role: Role, source: str) -> None:
        """Collect ``module`` under ``name``, or record ``name`` as an alias when it was collected before."""
        first = self.by_id.get(id(module))
        if first is None:
            entry = _Entry(name, module, role, source)
            self.entries.append(entry)
            self.by_id[id(module)] = entry
            return
        if name != first.name and name not in first.aliases:
            first.aliases.append(name)
        if first.role is not role:
            self.warn(
                f"{self.cls}: {role} '{name}' is the same module as {first.role} '{first.name}'; it is collected "
                f"once, as {first.role} '{first.name}'."
            )

    def of_role(self, role: Role) -> list[_Entry]:
        return [e for e in self.entries if e.role is role]


# ------------------------------------------------------------------------------------------------ sources


def _declared_names(c: _Collector, attr: str) -> list[str]:
    value = getattr(c.pipeline, attr, [])
    if value is None:
        return []
    if isinstance(value, str):
        c.warn(
            f"{c.cls}.{attr} is the string {value!r}; declare a list of attribute paths, e.g. [{value!r}]."
        )
        return [value]
    if not isinstance(value, Iterable):
        c.warn(f"{c.cls}.{attr} is a {type(value).__name__}, not a list of attribute paths; it is ignored.")
        return []
    names = []
    for item in value:
        if isinstance(item, str):
            names.append(item)
        else:
            c.warn(
                f"{c.cls}.{attr} holds {item!r}, which is not an attribute path (a string); it is skipped."
            )
    return names


def _collect_declared(c: _Collector) -> None:
    c.source = "protocol"
    for attr, role_name in _DECLARED_LISTS:
        role = Role(role_name)
        names = _declared_names(c, attr)
        c.looked_at.append(f"{c.cls}.{attr} = {names!r}")
        for path in names:
            value, problem, steps = _resolve(c.pipeline, path)
            c.wrappers.extend(steps)
            if value is _MISSING:
                c.warn(f"{c.cls}: declared {role} module '{path}' was not found ({problem}); it is skipped.")
            elif value is None:
                c.warn(f"{c.cls}: declared {role} module '{path}' is None; it is skipped.")
            elif not isinstance(value, nn.Module):
                c.warn(
                    f"{c.cls}: declared {role} module '{path}' is a {type(value).__name__}, not an nn.Module; it "
                    f"is skipped. If it wraps a module, declare the path of the module inside it."
                )
            else:
                c.add(path, value, role, "declared")


def _warn_partial_protocol(c: _Collector) -> None:
    present = [attr for attr, _ in _DECLARED_LISTS[:3] if hasattr(type(c.pipeline), attr)]
    if present:
        absent = [attr for attr, _ in _DECLARED_LISTS[:3] if attr not in present]
        c.warn(
            f"{c.cls} declares {', '.join(present)} but not {', '.join(absent)}; the protocol needs all three, so "
            f"its declaration is ignored and discovery falls back."
        )


def _vae_class(name: str) -> bool:
    lowered = name.lower()
    return lowered.startswith(("autoencoder", "vqmodel")) or "vae" in lowered


def _classify(pipeline: object, name: str, module: nn.Module) -> Role:
    """The role of a diffusers component, from its class; from its name when the class says nothing."""
    cls = type(module)
    if _vae_class(cls.__name__):
        return Role.VAE
    if (
        _is_instance(module, "diffusers.models.modeling_utils", "ModelMixin")
        and "ControlNet" not in cls.__name__
    ):
        if any(k in cls.__name__ for k in ("Transformer", "UNet", "DiT")) or getattr(
            cls, "_repeated_blocks", None
        ):
            return Role.DIT
    if _is_instance(module, "transformers.modeling_utils", "PreTrainedModel"):
        excluded = getattr(pipeline, "_exclude_from_cpu_offload", None) or ()
        if name not in excluded and not any(k in name for k in _POSTPROCESSOR_NAMES):
            return Role.ENCODER
    for role, names in (
        (Role.DIT, DIT_SCAN_NAMES),
        (Role.ENCODER, ENCODER_SCAN_NAMES),
        (Role.VAE, VAE_SCAN_NAMES),
    ):
        if name in names:
            return role
    return Role.OTHER


def _diffusers_components(pipeline: object) -> dict[str, object] | None:
    try:
        components = pipeline.components
    except Exception as exc:  # a half-built pipeline; fall back to the name scan
        logger.debug("%s.components raised %s: %s", type(pipeline).__name__, type(exc).__name__, exc)
        return None
    return dict(components) if isinstance(components, Mapping) else None


def _offload_order(pipeline: object, names: list[str]) -> list[str]:
    """``names`` in ``model_cpu_offload_seq`` order, then the rest in ``components`` order."""
    seq = getattr(pipeline, "model_cpu_offload_seq", None)
    ordered: list[str] = []
    for name in seq.split("->") if isinstance(seq, str) else []:
        name = name.strip()
        if name in names and name not in ordered:
            ordered.append(name)
    return ordered + [n for n in names if n not in ordered]


def _collect_components(c: _Collector, components: dict[str, object]) -> None:
    c.source = "diffusers"
    seen = []
    for name in _offload_order(c.pipeline, list(components)):
        module = components[name]
        if not isinstance(module, nn.Module):
            seen.append(f"{name} ({'None' if module is None else type(module).__name__}: not a module)")
            continue
        role = _classify(c.pipeline, name, module)
        seen.append(f"{name} ({type(module).__name__} -> {role})")
        if role is Role.OTHER and not _has_tensors(module):
            continue
        c.add(name, module, role, "components")
    c.looked_at.append(f"the diffusers components of {c.cls}: {', '.join(seen) or 'none'}")


def _collect_scan(c: _Collector) -> None:
    c.source = "scan"
    for role, names in (
        (Role.DIT, DIT_SCAN_NAMES),
        (Role.ENCODER, ENCODER_SCAN_NAMES),
        (Role.VAE, VAE_SCAN_NAMES),
    ):
        c.looked_at.append(f"the {role} attribute names {', '.join(names)}")
        for name in names:
            value, _, _ = _resolve(c.pipeline, name)
            if isinstance(value, nn.Module):  # missing, None and non-modules are skipped silently here
                c.add(name, value, role, "scan")


# --------------------------------------------------------------------------------------- nesting and others


def _absorb_nested(c: _Collector) -> None:
    """Keep only the outermost of collected modules nested in one another; record the inner ones."""
    inside = {id(e): {id(m) for m in e.module.modules()} - {id(e.module)} for e in c.entries}
    owner: dict[int, _Entry] = {}
    kept: list[_Entry] = []
    # The outer of two nested modules has strictly more descendants; a stable sort keeps declaration order
    # among equals (and picks the first of a reference cycle).
    for entry in sorted(c.entries, key=lambda e: -len(inside[id(e)])):
        outer = next((k for k in kept if id(entry.module) in inside[id(k)]), None)
        if outer is None:
            kept.append(entry)
        else:
            owner[id(entry)] = outer
    for entry in c.entries:
        outer = owner.get(id(entry))
        if outer is None:
            continue
        outer.absorbed.extend([entry.name, *entry.aliases])
        del c.by_id[id(entry.module)]
        c.warn(
            f"{c.cls}: {entry.role} '{entry.name}' is nested inside {outer.role} '{outer.name}'; it is handled as "
            f"part of '{outer.name}' and not collected on its own."
        )
    c.entries = [e for e in c.entries if id(e) not in owner]
    for entry in c.entries:
        c.covered.update(id(m) for m in entry.module.modules())


def _place_other(c: _Collector, path: str, module: nn.Module, visited: set[int]) -> None:
    """Put an uncovered module with weights into ``others``; split a container of collected modules."""
    entry = c.by_id.get(id(module))
    if entry is not None:
        if path != entry.name and path not in entry.aliases:
            entry.aliases.append(path)
        return
    if id(module) in c.covered or id(module) in visited or not _has_tensors(module):
        return
    visited.add(id(module))
    if not any(id(m) in c.covered for m in module.modules()):
        c.add(path, module, Role.OTHER, "others")
        c.covered.update(id(m) for m in module.modules())
        return
    own = _own_tensor_bytes(module)
    if own:
        c.warn(
            f"{c.cls}: '{path}' contains collected modules and also holds {own} bytes of weights of its own; "
            f"those are not placed. Declare '{path}' itself, or move the weights into a submodule."
        )
    for name, child in module.named_children():
        _place_other(c, f"{path}.{name}", child, visited)


def _collect_others(c: _Collector, components: dict[str, object] | None) -> None:
    candidates: list[tuple[str, object]] = list(components.items()) if components else []
    candidates += _attribute_items(c.pipeline)
    # One level into the objects that declared paths go through (LTX-2's plain ``pipe`` wrapper).
    wrappers = {}
    for prefix, obj in c.wrappers:
        wrappers.setdefault(id(obj), (prefix, obj))  # each object once, under the first path that reached it
    for prefix, obj in wrappers.values():
        if isinstance(obj, nn.Module):
            candidates.append((prefix, obj))
        else:
            candidates += [(f"{prefix}.{name}", value) for name, value in _attribute_items(obj)]
    visited: set[int] = set()
    for path, value in candidates:
        if isinstance(value, nn.Module):
            _place_other(c, path, value, visited)


def _no_dit_error(c: _Collector) -> DiscoveryError:
    found = [f"{e.role} '{e.name}'" for e in c.entries]
    others = sorted((e for e in c.entries if e.role is Role.OTHER), key=lambda e: -param_bytes(e.module))
    dit = others[0].name if others else "transformer"
    encoders = [e.name for e in c.of_role(Role.ENCODER)] or ["text_encoder"]
    vaes = [e.name for e in c.of_role(Role.VAE)] or ["vae"]
    lines = [
        f"No DiT (denoiser) found in {c.cls}. Discovery used the {c.source} source and looked at:",
        *(f"  - {item}" for item in c.looked_at),
        f"Modules found: {', '.join(found) or 'none'}.",
    ]
    if c.warnings:
        lines.append("Warnings: " + " | ".join(c.warnings))
    lines += [
        "Declare the roles on the pipeline class (the SupportsModuleOffload protocol); paths may be dotted:",
        "",
        f"    class {c.cls}:",
        f"        _dit_modules = [{dit!r}]",
        f"        _encoder_modules = {encoders!r}",
        f"        _vae_modules = {vaes!r}",
        "        _resident_modules = []",
    ]
    return DiscoveryError("\n".join(lines))


# ------------------------------------------------------------------------------------------------- blocks


class _BlockError(Exception):
    pass


def _module_lists(dit: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    return [(path, m) for path, m in dit.named_modules() if isinstance(m, nn.ModuleList)]


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


def _heuristic_blocks(dit: nn.Module) -> tuple[tuple[str, ...], list[tuple[str, nn.Module]]] | None:
    """The same-class ``ModuleList``s that hold the DiT's repeated blocks, in definition order."""
    candidates = []
    for index, (path, lst) in enumerate(_module_lists(dit)):
        children = list(lst.children())
        if children and len({type(m) for m in children}) == 1 and _has_tensors(lst):
            candidates.append((index, path, lst, type(children[0]).__name__))
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


def _find_blocks(c: _Collector, entry: _Entry, override: tuple[str, ...] | None) -> BlockSet | None:
    dit = entry.module
    if override is not None:
        try:
            return _blockset(entry.name, dit, override, "config")
        except _BlockError as exc:
            raise DiscoveryError(
                f"{c.cls}: block_attrs for DiT '{entry.name}' ({type(dit).__name__}): {exc}. Its ModuleLists: "
                f"{_describe_lists(dit)}."
            ) from None
    found = _structural_blocks(entry.name, dit, "DiT", lambda message: c.warn(f"{c.cls}: {message}"))
    if found is None:
        c.warn(
            f"{c.cls}: DiT '{entry.name}' ({type(dit).__name__}) shows no repeated blocks (no nn.ModuleList of one "
            f"block class holding most of its weights; its ModuleLists: {_describe_lists(dit)}); layerwise offload "
            f"will move it as one unit. Name them with {type(dit).__name__}._offload_block_attrs = [...] or "
            f"OffloadConfig(block_attrs={{{entry.name!r}: (...)}})."
        )
    return found


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


def _block_overrides(c: _Collector, block_attrs: Mapping | None) -> dict[int, tuple[str, ...]]:
    """``block_attrs`` keyed by DiT entry; an unknown DiT name is an error that lists the DiTs."""
    dits = c.of_role(Role.DIT)
    by_name = {name: e for e in dits for name in (e.name, *e.aliases)}
    overrides: dict[int, tuple[str, ...]] = {}
    for key, attrs in dict(block_attrs or {}).items():
        entry = by_name.get(key)
        if entry is None:
            listing = "; ".join(f"'{e.name}' (ModuleLists: {_describe_lists(e.module)})" for e in dits)
            raise DiscoveryError(
                f"{c.cls}: block_attrs names '{key}', which is not a DiT. Its DiTs: {listing}."
            )
        if id(entry) in overrides:
            raise DiscoveryError(f"{c.cls}: block_attrs gives DiT '{entry.name}' twice (once as '{key}').")
        attrs = (attrs,) if isinstance(attrs, str) else tuple(attrs)
        if not attrs or not all(isinstance(a, str) for a in attrs):
            raise DiscoveryError(f"{c.cls}: block_attrs['{key}'] must be attribute names, got {attrs!r}.")
        overrides[id(entry)] = attrs
    return overrides


# -------------------------------------------------------------------------------------------------- entry


def discover(
    pipeline: object, *, strict: bool = False, block_attrs: Mapping | None = None
) -> PipelineModules:
    """Collect ``pipeline``'s modules by role, each DiT's repeated blocks and each encoder's repeated layers.

    Sources, first that applies: the :class:`~vramferry.protocol.SupportsModuleOffload` declaration (all or
    nothing), a diffusers pipeline's ``components`` classified by class, a scan of well-known attribute names.
    Every other module with weights reachable from the pipeline lands in ``others``.

    Args:
        pipeline: any pipeline object (a diffusers ``DiffusionPipeline``, a plain class, an ``nn.Module``).
        strict: raise :class:`~vramferry.errors.DiscoveryError` on what would otherwise be a warning.
        block_attrs: per DiT name (or alias), the attribute paths holding its blocks in execution order;
            overrides the DiT's declaration and the heuristic.

    Returns:
        A :class:`PipelineModules`; ``warnings`` holds every warning, also logged.

    Raises:
        DiscoveryError: no DiT was found (the message shows what was looked at and a declaration to copy), a
            ``block_attrs`` entry is wrong, or ``strict`` and something was warned about.
    """
    c = _Collector(pipeline, strict)
    components = _diffusers_components(pipeline) if _is_diffusion_pipeline(pipeline) else None
    if declares_offload(pipeline):
        _collect_declared(c)
    else:
        _warn_partial_protocol(c)
        if components is not None:
            _collect_components(c, components)
        else:
            _collect_scan(c)
    _absorb_nested(c)
    _collect_others(c, components)
    if not c.of_role(Role.DIT):
        raise _no_dit_error(c)
    overrides = _block_overrides(c, block_attrs)
    blocks = {}
    for entry in c.of_role(Role.DIT):
        found = _find_blocks(c, entry, overrides.get(id(entry)))
        if found is not None:
            blocks[entry.name] = found
    encoder_blocks = {}
    for entry in c.of_role(Role.ENCODER):
        found = find_encoder_blocks(entry.name, entry.module, lambda m: c.warn(f"{c.cls}: {m}"))
        if found is not None:
            encoder_blocks[entry.name] = found
    result = PipelineModules(
        pipeline_class=c.cls,
        source=c.source,
        blocks=blocks,
        encoder_blocks=encoder_blocks,
        warnings=c.warnings,
    )
    lists = {Role.DIT: result.dits, Role.ENCODER: result.encoders, Role.VAE: result.vaes}
    lists.update({Role.RESIDENT: result.resident, Role.OTHER: result.others})
    for entry in c.entries:
        lists[entry.role].append(entry.freeze())
    return result
