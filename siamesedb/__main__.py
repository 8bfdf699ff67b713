"""`python -m siamesedb` runs the command-line interface."""

from siamesedb.cli import main

main()
