"""`python -m cove` runs the cove command."""

from cove.cli import run_main

run_main()
