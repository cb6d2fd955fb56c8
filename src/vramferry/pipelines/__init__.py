"""Pipelines to run: loading a diffusers pipeline (local folder or Hub id) and the built-in demo.

Importing this package needs only torch; diffusers and transformers are imported when a pipeline is built or
loaded (``pip install 'vramferry[diffusers]'``).
"""

from .demo import DEMO_DEFAULTS, build_demo_pipeline
from .loading import DTYPES, load_pipeline, parse_dtype

__all__ = ["DEMO_DEFAULTS", "DTYPES", "build_demo_pipeline", "load_pipeline", "parse_dtype"]
