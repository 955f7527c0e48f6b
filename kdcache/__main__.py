"""`python -m kdcache ...` (and `torchrun -m kdcache ...`) runs the CLI."""

from .cli import main

main()
