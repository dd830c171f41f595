"""``python -m training.eval``: see ``training.eval.cli``."""

from training.eval.cli import main

main()
