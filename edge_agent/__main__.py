import sys

from .cli import main

if __name__ == "__main__":  # guard: multiprocessing's spawn re-imports the parent's __main__
    sys.exit(main())
