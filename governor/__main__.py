"""``python -m governor``: the same as the ``governor`` command."""

from governor.cli import main

main(prog_name="governor")
