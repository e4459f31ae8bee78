"""The shared contract of aigc-runner: settings, schema, storage, job spec, errors."""

__version__ = "0.1.0"
