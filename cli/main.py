"""The `svdforge` command line: `compress` and `evaluate` (core library), `serve` and `keys` (service)."""
from __future__ import annotations

import sys

import typer

from svdforge.cli.app import app


def _register() -> None:
    from svdforge.cli import core_cmds  # noqa: F401 - registers compress / evaluate
    try:
        from svdforge.cli import service_cmds  # noqa: F401 - registers serve / keys
    except ImportError as e:  # service extras missing: the library CLI still works
        if "service_cmds" not in str(e):
            raise


def main() -> None:
    _register()
    try:
        app(standalone_mode=False)
    except SystemExit:
        raise
    except Exception as e:  # one line, exit 2, never a traceback for user errors
        from svdforge.core.errors import Cancelled, UserError

        if type(e).__name__ == "Abort":
            sys.exit(130)
        if hasattr(e, "format_message") and hasattr(e, "exit_code"):  # typer's (vendored) click usage errors
            typer.echo(f"error: {e.format_message()}", err=True)
            sys.exit(2)
        if isinstance(e, UserError):
            typer.echo(f"error: {e}", err=True)
            sys.exit(2)
        if isinstance(e, Cancelled):
            typer.echo("cancelled", err=True)
            sys.exit(130)
        raise

if __name__ == "__main__":
    main()
