"""`python -m saelab.cli ...`: the same command as `saelab ...`, every subcommand included."""

from saelab.cli import main

if __name__ == "__main__":
    main()
