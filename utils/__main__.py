"""`python -m utils NAME [NAME ...]`: say what each dataset name stands for, then load it."""

import argparse
import sys

from utils.data import load_dataset
from utils.errors import UserError


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m utils", description=__doc__)
    parser.add_argument(
        "names", nargs="+", help="D4RL-style name (hopper-medium) or Minari id (mujoco/hopper/medium-v0)"
    )
    args = parser.parse_args(argv)
    try:
        for name in args.names:
            print(load_dataset(name).describe())
    except UserError as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
