"""The `saelab` command: every command group assembled into one typer app, and its entry point.

Each group lives in its own module and imports only `saelab.cli.common`; this module imports the
groups, so nothing imports back up. Heavy modules load inside the commands: --help stays fast.
"""

from __future__ import annotations

import typer

from saelab.cli import (
    analyze,
    audit,
    circuit,
    demo,
    diff,
    direction,
    evaluate,
    explain,
    finetune,
    graph,
    harvest,
    serve,
    steer,
    toy,
    train,
)
from saelab.cli.common import exit_on_interrupt, exit_on_user_error
from saelab.errors import SaelabError

app = typer.Typer(
    help="saelab: train, evaluate and interpret sparse dictionaries on language-model activations.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# The order here is the order `saelab --help` lists them in.
app.command()(harvest.harvest)
app.command()(train.train)
app.command("eval")(evaluate.eval_command)
app.command()(analyze.analyze)
app.command()(explain.explain)
app.command()(circuit.circuit)
app.command("graph")(graph.graph_command)
app.command("diff")(diff.diff_command)
app.command("finetune")(finetune.finetune_command)
app.command("audit")(audit.audit_command)
app.command()(serve.serve)
app.command("export")(serve.export_command)
app.command()(demo.demo)
app.add_typer(toy.toy_app, name="toy")
app.add_typer(steer.steer_app, name="steer")
app.add_typer(direction.direction_app, name="direction")


def main() -> None:
    """Entry point: user errors become one paragraph on stderr and exit status 2."""
    try:
        app()
    except SaelabError as err:
        exit_on_user_error(err)
    except KeyboardInterrupt:
        exit_on_interrupt()
