"""Integrations with other libraries, each imported only when asked for
(flashattn_cupy.integrations.transformers needs transformers and torch)."""
