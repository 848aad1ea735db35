"""``python -m lctw.runs.report <sweep dir | W&B group>``: see :mod:`lctw.runs.report`."""

import logging

from lctw.runs.report import main

logging.basicConfig(level=logging.INFO, format="%(message)s")
main()
