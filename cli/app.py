"""The typer application every command module registers on."""
import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Compress Hugging Face causal LMs by truncation-aware SVD.")
