"""`tetrispec <command>`: each command lives in tetrispec/commands/<name>.py with
`register(subparsers)` and a `run(args) -> int` set as the parser's default `func`."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import NoReturn

COMMANDS = ["generate", "serve", "bench", "sweep", "profile", "distill"]


class CLIError(Exception):
    """A user error: printed as one line, exit code 2."""


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr: the usage block argparse prints first
    runs to 30 lines for the engine commands and buries the error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="tetrispec", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"tetrispec.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"tetrispec.commands.{name}":
                raise
            continue
        module.register(sub)
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except (CLIError, ValueError, FileNotFoundError) as e:
        print(f"tetrispec {args.command}: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    # Under `python -m`, this module is __main__ and its CLIError is not the class commands
    # raise (tetrispec.cli.CLIError): run the imported module's main instead.
    from tetrispec.cli import main as package_main

    sys.exit(package_main())
