"""`python -m rag_cli` runs the `rag` command (what `rag up` uses to start its children)."""

import sys

from rag_cli.main import main

sys.exit(main())
