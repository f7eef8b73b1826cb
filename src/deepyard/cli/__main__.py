"""`python -m deepyard.cli`: the same command as `deepyard`."""

from deepyard.cli import main

main()
