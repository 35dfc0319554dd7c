"""``python -m cnnkit`` (and ``torchrun -m cnnkit``) run the CLI."""

from cnnkit.cli import main

main()
