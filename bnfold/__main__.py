"""`python -m bnfold …` runs the `bnfold` command (for environments where the console script is not on PATH)."""

from bnfold.cli import main

if __name__ == "__main__":
    main(prog_name="bnfold")
