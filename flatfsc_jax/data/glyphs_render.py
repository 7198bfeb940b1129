"""TEMPORARY bridge, delete with its commit: the renderer moved to ``tools/glyphs_render.py``.

``config_lib.benchmark_domains`` (outside this change) still imports ``DOMAINS`` from here;
once it imports ``flatfsc_jax.data.glyphs_spec`` instead, delete this file.
"""

from flatfsc_jax.data.glyphs_spec import DOMAINS

__all__ = ["DOMAINS"]
