"""Generation and training backends. Imports nothing of the runner's own: workers adapt to it."""

from aigc_models.base import Generator, GenRequest, Output, load_backend

__all__ = ["GenRequest", "Generator", "Output", "load_backend"]
