"""Full-size pipeline architectures built on the meta device: real diffusers/transformers classes with the
published configs, no weights, no downloads. They give the planner exact byte counts (``vramferry plan
--arch flux1-dev``) and the benchmarks their shapes.

Building allocates nothing (meta tensors) and takes well under a second per architecture once diffusers and
transformers are imported; both are imported lazily, inside the builders.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..discovery.blocks import BlockSet
from ..discovery.inventory import Inventory, inventory_of
from ..discovery.modules import Component, PipelineModules, Role
from .workload import Workload


class ArchPipeline:
    """A pipeline-shaped holder of meta modules, named like the diffusers pipeline it mirrors.

    It declares its roles the way a pipeline implementing ``SupportsModuleOffload`` does, so discovery reads
    them from the class variables.
    """

    _dit_modules: ClassVar[list[str]] = []
    _encoder_modules: ClassVar[list[str]] = []
    _vae_modules: ClassVar[list[str]] = []
    _resident_modules: ClassVar[list[str]] = []

    def __init__(self, **modules: nn.Module) -> None:
        for name, module in modules.items():
            setattr(self, name, module)
        self._names = tuple(modules)

    @classmethod
    def cast(cls, dtype: torch.dtype, **modules: nn.Module) -> ArchPipeline:
        """The pipeline of ``modules``, each cast to ``dtype`` as a loader would (see :func:`_finish`)."""
        return cls(**{name: _finish(module, dtype) for name, module in modules.items()})

    @property
    def components(self) -> dict[str, nn.Module]:
        """The modules by attribute name, like ``DiffusionPipeline.components``."""
        return {name: getattr(self, name) for name in self._names}


class FluxArchPipeline(ArchPipeline):
    _dit_modules = ["transformer"]
    _encoder_modules = ["text_encoder", "text_encoder_2"]
    _vae_modules = ["vae"]


class WanArchPipeline(ArchPipeline):
    _dit_modules = ["transformer"]
    _encoder_modules = ["text_encoder"]
    _vae_modules = ["vae"]


class Wan22ArchPipeline(ArchPipeline):
    _dit_modules = ["transformer", "transformer_2"]  # the high-noise expert, then the low-noise one
    _encoder_modules = ["text_encoder"]
    _vae_modules = ["vae"]


class QwenImageArchPipeline(ArchPipeline):
    _dit_modules = ["transformer"]
    _encoder_modules = ["text_encoder"]
    _vae_modules = ["vae"]


def _finish(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast to ``dtype`` as ``from_pretrained(torch_dtype=...)`` does, keeping the fp32 modules it keeps.

    diffusers keeps ``_keep_in_fp32_modules`` in fp32 for any dtype; transformers only for fp16, and
    ``_keep_in_fp32_modules_strict`` for fp16 and bf16 (so T5's ``wo`` stays bf16 in a bf16 load).
    """
    # nn.Module.to, not the diffusers override: the latter warns about exactly this cast.
    nn.Module.to(module, dtype=dtype)
    if hasattr(module, "_keep_in_fp32_modules_strict"):  # a transformers model
        keep = tuple(getattr(module, "_keep_in_fp32_modules_strict", None) or ())
        if dtype == torch.float16:
            keep += tuple(getattr(module, "_keep_in_fp32_modules", None) or ())
    else:
        keep = tuple(getattr(module, "_keep_in_fp32_modules", None) or ())
    if keep:
        for name, child in module.named_modules():
            if any(part in keep for part in name.split(".")):
                nn.Module.to(child, dtype=torch.float32)
    return module.eval().requires_grad_(False)


# The published configs, shared with the benchmarks' full-size builders.
T5_XXL = dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, feed_forward_proj="gated-gelu")
FLUX1_DEV_TRANSFORMER = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)  # fmt: skip
FLUX1_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2, norm_num_groups=32, sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159,
    use_quant_conv=False, use_post_quant_conv=False,
)  # fmt: skip


def _t5_xxl(vocab_size: int, umt5: bool) -> nn.Module:
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    if umt5:
        return UMT5EncoderModel(UMT5Config(vocab_size=vocab_size, **T5_XXL))
    return T5EncoderModel(T5Config(vocab_size=vocab_size, **T5_XXL))


def build_flux1_dev(dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "meta") -> ArchPipeline:
    """FLUX.1-dev: FluxTransformer2DModel (19 double + 38 single blocks), CLIP-L, T5-XXL, AutoencoderKL 16 ch.

    Every builder takes ``device``: ``"meta"`` (the default) allocates nothing; another device builds random
    weights there (set torch's default dtype to ``dtype`` first to skip the fp32 intermediate).
    """
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device(device):
        transformer = FluxTransformer2DModel(**FLUX1_DEV_TRANSFORMER)
        clip = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
            )
        )  # fmt: skip
        t5 = _t5_xxl(32128, umt5=False)
        vae = AutoencoderKL(**FLUX1_VAE)
    return FluxArchPipeline.cast(
        dtype, text_encoder=clip, text_encoder_2=t5, transformer=transformer, vae=vae
    )


WAN_14B_TRANSFORMER = dict(
    patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
)  # fmt: skip
WAN_VAE = dict(
    base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
    temperal_downsample=[False, True, True],
)  # fmt: skip


def build_wan21_t2v_14b(
    dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "meta"
) -> ArchPipeline:
    """Wan2.1-T2V-14B: WanTransformer3DModel (40 blocks, width 5120), UMT5-XXL, AutoencoderKLWan."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    with torch.device(device):
        transformer = WanTransformer3DModel(**WAN_14B_TRANSFORMER)
        umt5 = _t5_xxl(256384, umt5=True)
        vae = AutoencoderKLWan(**WAN_VAE)
    return WanArchPipeline.cast(dtype, text_encoder=umt5, transformer=transformer, vae=vae)


def build_wan22_t2v_a14b(
    dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "meta"
) -> ArchPipeline:
    """Wan2.2-T2V-A14B: two 14B experts of Wan2.1's shape (high noise, then low noise), UMT5-XXL, the Wan2.1
    VAE; diffusers' WanPipeline with ``transformer_2`` and ``boundary_ratio``."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    with torch.device(device):
        high, low = (WanTransformer3DModel(**WAN_14B_TRANSFORMER) for _ in range(2))
        umt5 = _t5_xxl(256384, umt5=True)
        vae = AutoencoderKLWan(**WAN_VAE)
    return Wan22ArchPipeline.cast(dtype, text_encoder=umt5, transformer=high, transformer_2=low, vae=vae)


def build_qwen_image(
    dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "meta"
) -> ArchPipeline:
    """Qwen-Image: QwenImageTransformer2DModel (60 blocks), Qwen2.5-VL-7B-Instruct, AutoencoderKLQwenImage."""
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text_config = dict(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, max_position_embeddings=128000, rms_norm_eps=1e-6, hidden_act="silu",
    )  # fmt: skip
    vision_config = dict(
        depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, in_channels=3, out_hidden_size=3584,
        patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
        fullatt_block_indexes=[7, 15, 23, 31], hidden_act="silu",
    )  # fmt: skip
    with torch.device(device):
        transformer = QwenImageTransformer2DModel(
            patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
            num_attention_heads=24, joint_attention_dim=3584, guidance_embeds=False, axes_dims_rope=(16, 56, 56),
        )  # fmt: skip
        config = Qwen2_5_VLConfig(
            text_config=text_config, vision_config=vision_config, tie_word_embeddings=False
        )
        qwen = Qwen2_5_VLForConditionalGeneration(config)
        vae = AutoencoderKLQwenImage(
            base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
            temperal_downsample=[False, True, True],
        )  # fmt: skip
    return QwenImageArchPipeline.cast(dtype, text_encoder=qwen, transformer=transformer, vae=vae)


@dataclass(frozen=True)
class ArchSpec:
    """A built-in architecture.

    Attributes:
        name: the key in :data:`ARCHS`.
        pipeline_class: the diffusers pipeline class it mirrors.
        build: returns an :class:`ArchPipeline` of meta modules.
        block_attrs: per DiT attribute, the attributes holding its blocks in execution order.
        workload: the model card's default request.
        description: one line for listings.
    """

    name: str
    pipeline_class: str
    build: Callable[..., ArchPipeline] = field(repr=False)
    block_attrs: Mapping[str, tuple[str, ...]]
    workload: Workload
    description: str = ""

    def modules(self, pipeline: ArchPipeline | None = None) -> PipelineModules:
        """The roles and blocks of a built pipeline, read from its declaration (no discovery heuristics)."""
        pipe = pipeline if pipeline is not None else self.build()
        found = PipelineModules(pipeline_class=self.pipeline_class, source="protocol")
        by_role = (
            (Role.DIT, pipe._dit_modules, found.dits),
            (Role.ENCODER, pipe._encoder_modules, found.encoders),
            (Role.VAE, pipe._vae_modules, found.vaes),
            (Role.RESIDENT, pipe._resident_modules, found.resident),
        )
        for role, names, bucket in by_role:
            for name in names:
                bucket.append(Component(name=name, module=getattr(pipe, name), role=role, source="declared"))
        for dit, attrs in self.block_attrs.items():
            module = getattr(pipe, dit)
            names, blocks = [], []
            for attr in attrs:
                for index, block in enumerate(getattr(module, attr)):
                    names.append(f"{attr}.{index}")
                    blocks.append(block)
            found.blocks[dit] = BlockSet(dit, tuple(attrs), tuple(names), tuple(blocks), found_by="declared")
        return found

    def inventory(self) -> Inventory:
        """Byte sizes of every component and block (built once, then cached)."""
        cached = _INVENTORIES.get(self.name)
        if cached is None:
            cached = _INVENTORIES[self.name] = inventory_of(self.modules())
        return cached

    def with_workload(self, **changes: Any) -> Workload:
        """The default workload with ``changes`` (``height=512``, ``steps=4``...)."""
        return dataclasses.replace(self.workload, **changes)


_INVENTORIES: dict[str, Inventory] = {}

ARCHS: dict[str, ArchSpec] = {
    spec.name: spec
    for spec in (
        ArchSpec(
            name="flux1-dev",
            pipeline_class="FluxPipeline",
            build=build_flux1_dev,
            block_attrs={"transformer": ("transformer_blocks", "single_transformer_blocks")},
            workload=Workload(height=1024, width=1024, cfg=1, steps=28, text_tokens=512),
            description="FLUX.1-dev 12B: 19 double + 38 single blocks, CLIP-L + T5-XXL, 16-channel VAE",
        ),
        ArchSpec(
            name="wan2.1-t2v-14b",
            pipeline_class="WanPipeline",
            build=build_wan21_t2v_14b,
            block_attrs={"transformer": ("blocks",)},
            workload=Workload(height=480, width=832, num_frames=81, cfg=2, steps=50, text_tokens=512),
            description="Wan2.1 T2V 14B: 40 blocks of width 5120, UMT5-XXL, causal 3D VAE",
        ),
        ArchSpec(
            name="wan2.2-t2v-a14b",
            pipeline_class="WanPipeline",
            build=build_wan22_t2v_a14b,
            block_attrs={"transformer": ("blocks",), "transformer_2": ("blocks",)},
            workload=Workload(height=720, width=1280, num_frames=81, cfg=2, steps=40, text_tokens=512),
            description="Wan2.2 T2V A14B: two 14B experts (high and low noise), UMT5-XXL, causal 3D VAE",
        ),
        ArchSpec(
            name="qwen-image",
            pipeline_class="QwenImagePipeline",
            build=build_qwen_image,
            block_attrs={"transformer": ("transformer_blocks",)},
            workload=Workload(height=1328, width=1328, cfg=2, steps=50, text_tokens=256),
            description="Qwen-Image 20B: 60 blocks, Qwen2.5-VL-7B text encoder, Qwen-Image VAE",
        ),
    )
}


def get_arch(name: str) -> ArchSpec:
    """The :class:`ArchSpec` called ``name``.

    Raises:
        ValueError: naming the valid architectures.
    """
    try:
        return ARCHS[name]
    except KeyError:
        raise ValueError(f"arch: unknown architecture {name!r}; choose one of {', '.join(ARCHS)}") from None
