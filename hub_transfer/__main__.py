"""Entry point for ``python -m hub_transfer``, which is how the hub launches us."""

from .app import main

if __name__ == "__main__":
    main()
