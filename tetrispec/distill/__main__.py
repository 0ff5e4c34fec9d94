"""`python -m tetrispec.distill ...` is `tetrispec distill ...` without loading the other commands
(whose server dependencies a bare GPU box may not have)."""

import argparse
import sys

from tetrispec.commands import distill

parser = argparse.ArgumentParser(prog="python -m tetrispec.distill")
sub = parser.add_subparsers(dest="command")
distill.register(sub)
sys.exit(distill.run(parser.parse_args(["distill", *sys.argv[1:]])) or 0)
