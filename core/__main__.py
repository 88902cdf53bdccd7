"""``python -m molting`` is the ``molting`` command (so ``accelerate launch -m molting run ...`` works)."""

from molting.cli import main

if __name__ == "__main__":
    main()
