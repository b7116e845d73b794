"""The HTTP server's entry point: `python -m ryzen_llm.serve --checkpoint PATH [--port P] ...`.

The server itself is the package ryzen_llm.serving (its docstring lists the endpoints and the
module that owns each job); this module keeps the names scripts and tests import from here.
"""
import sys

from ryzen_llm.serving.app import create_app
from ryzen_llm.serving.cli import MAKE_ONE, build_parser, latest_checkpoint, main

__all__ = ["MAKE_ONE", "build_parser", "create_app", "latest_checkpoint", "main"]

if __name__ == "__main__":
    sys.exit(main())
