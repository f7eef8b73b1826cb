"""`python -m deepyard ...`: the `deepyard` command (what a cluster job's entrypoint runs)."""

from deepyard.cli import main

main()
