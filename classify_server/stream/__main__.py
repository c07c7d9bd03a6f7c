"""`python -m classify_server.stream`."""
import sys

from classify_server.stream.cli import main

sys.exit(main())
