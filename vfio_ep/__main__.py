"""Allow ``python -m vfio_ep`` (the launcher starts the server this way)."""

from vfio_ep.cli import main

main()
