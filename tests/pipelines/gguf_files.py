"""A pipeline's transformer written as a GGUF file (the ``gguf`` package) and loaded back through diffusers'
``from_single_file`` with ``GGUFQuantizationConfig``: the same path as a city96-style GGUF checkpoint, offline.

Weights whose rows split into Q8_0 blocks (32 values) are quantized; the rest stay float32. Keys are diffusers'
own, so ``from_single_file`` loads them without a conversion.
"""

from __future__ import annotations

from pathlib import Path

import torch


def gguf_transformer(pipe, folder: Path):
    """``pipe.transformer`` saved as ``folder/transformer.gguf`` and loaded back quantized (Q8_0)."""
    import gguf
    from diffusers import GGUFQuantizationConfig

    transformer = pipe.transformer
    transformer.save_pretrained(folder)  # config.json, for from_single_file(config=...)
    path = folder / "transformer.gguf"
    writer = gguf.GGUFWriter(str(path), "vramferry-test")
    quantized = 0
    for name, tensor in transformer.state_dict().items():
        data = tensor.detach().float().numpy()
        if data.ndim == 2 and data.shape[-1] % 32 == 0:
            blocks = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(name, blocks, raw_shape=blocks.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            quantized += 1
        else:
            writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert quantized >= 4, f"only {quantized} tensors quantized: the fixture's widths are not multiples of 32"
    config = GGUFQuantizationConfig(compute_dtype=torch.float32)
    return type(transformer).from_single_file(
        str(path), config=str(folder), quantization_config=config, torch_dtype=torch.float32
    )
