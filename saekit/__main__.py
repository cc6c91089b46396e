"""`python -m saekit <command> ...`, as torchrun starts it: torchrun --nproc_per_node=N -m saekit train ..."""

from saekit.cli import main

main()
