"""The `svdforge` command line: `compress` and `evaluate` (core library), `serve` and `keys` (service)."""
from __future__ import annotations

import sys

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Compress Hugging Face causal LMs by truncation-aware SVD.")


def _register() -> None:
    from cli import core_cmds  # noqa: F401  (registers compress / evaluate)
    try:
        from cli import service_cmds  # noqa: F401  (registers serve / keys)
    except ImportError as e:  # service extras missing: the library CLI still works
        if "service_cmds" not in str(e):
            raise


def main() -> None:
    _register()
    try:
        app(standalone_mode=False)
    except SystemExit as e:
        raise
    except Exception as e:  # noqa: BLE001 - one line, exit 2, never a traceback for user errors
        import click

        from core.errors import Cancelled, UserError
        if isinstance(e, click.exceptions.Abort):
            sys.exit(130)
        if isinstance(e, click.ClickException):
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
