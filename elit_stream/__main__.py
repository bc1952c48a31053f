"""`python -m elit_stream …` is `elit-stream …`."""
import sys

from elit_stream.tools.cli import main

sys.exit(main())
