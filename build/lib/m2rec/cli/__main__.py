"""`python -m m2rec.cli ...` (used by torchrun) is the same as the `m2rec` command."""

from m2rec.cli import main

main()
