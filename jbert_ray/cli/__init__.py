"""`jbert` command line: flags generated from the config classes (cli.flags), one `run_*` function per command.

The jobs/ entrypoints (`ray job submit -- python -m jobs.<name>`) call this same `main`, so a cluster run and a
laptop run take the same flags. A user mistake prints one line and exits 2; a bug keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys

from jbert_ray.cli.data import add_data_commands
from jbert_ray.cli.model import add_model_commands
from jbert_ray.errors import Stopped, UserError

EXIT_USER_ERROR = 2
EXIT_STOPPED = 130  # as a shell reports a command ended by SIGINT


def main(argv: list[str] | None = None) -> int:
    """Parse `argv`, run the command, return the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    args = build_parser(command).parse_args(argv)
    try:
        args.handler(args)
    except Stopped as stopped:
        print(f"jbert {args.command}: {stopped}", file=sys.stderr)
        return EXIT_STOPPED
    except Exception as error:  # only user errors are turned into one line; the rest re-raise
        user_error = _find_user_error(error)
        if user_error is None:
            raise
        # First line only: Ray Data appends its own retry advice on new lines.
        print(f"jbert {args.command}: error: {str(user_error).splitlines()[0]}", file=sys.stderr)
        return EXIT_USER_ERROR
    return 0


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The `jbert` parser: one subcommand per stage (cli.data: corpus side; cli.model: model side), with the flags
    of `command` (generated from its config class)."""
    parser = argparse.ArgumentParser(
        prog="jbert",
        description="Pretrain, score and serve Japanese BERT models on Ray.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_data_commands(commands, command)
    add_model_commands(commands, command)
    return parser


def _find_user_error(error: BaseException) -> UserError | None:
    # Ray wraps exceptions raised in tasks and actors (RayTaskError(UserError) is itself a UserError, whose text is
    # the remote traceback): the innermost UserError of the chain is the user's mistake.
    found, seen = None, set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, UserError):
            found = error
        error = getattr(error, "cause", None) or error.__cause__ or error.__context__
    return found
