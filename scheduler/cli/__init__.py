"""The ``aigc`` command line: typer command groups, one module per role (root: jobs, the worker, the
database and the demo; models; schedules; ops). Roles are imported lazily inside the commands, so
``aigc submit`` and ``aigc status`` start fast and never load torch."""

from scheduler.cli.root import app, console_main, main

__all__ = ["app", "console_main", "main"]
