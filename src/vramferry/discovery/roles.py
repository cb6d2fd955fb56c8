"""Find a pipeline's modules and their roles: the protocol, else diffusers' components, else a name scan.

Discovery is pure: it reads attributes and walks module trees, moves nothing, makes no CUDA calls, and works on
meta-device modules. diffusers and transformers are never imported here: a pipeline or module can only be an
instance of their classes once the caller has imported them, so their classes are looked up in ``sys.modules``.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from torch import nn

from ..errors import DiscoveryError
from ..protocol import declares_offload
from .blocks import BlockSet, _BlockError, _blockset, _describe_lists, _structural_blocks, find_encoder_blocks
from .modules import Component, PipelineModules, Role
from .paths import _MISSING, _resolve
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


_DECLARED_LISTS = (
    ("_dit_modules", "dit"),
    ("_encoder_modules", "encoder"),
    ("_vae_modules", "vae"),
    ("_resident_modules", "resident"),
)


# Pretrained transformers models that run after decoding, not as encoders.
_POSTPROCESSOR_NAMES = ("safety_checker", "watermark", "vocoder")


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
    result.order = request_order(pipeline, result)
    return result


def request_order(pipeline: object, modules: PipelineModules) -> tuple[str, ...]:
    """The components a request runs, in order: diffusers' ``model_cpu_offload_seq`` first, then the
    encoders, DiTs and VAEs it leaves out, each in declaration (or discovery) order. A protocol pipeline's
    order is its declaration's: encoders, then DiTs, then VAEs."""
    order: list[str] = []
    seq = getattr(type(pipeline), "model_cpu_offload_seq", None)
    for name in seq.split("->") if isinstance(seq, str) else ():
        try:
            component = modules.get(name.strip())
        except KeyError:
            continue
        if component.name not in order and component.role in (Role.ENCODER, Role.DIT, Role.VAE):
            order.append(component.name)
    for component in [*modules.encoders, *modules.dits, *modules.vaes]:
        if component.name not in order:
            order.append(component.name)
    return tuple(order)
