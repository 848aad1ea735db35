"""``python -m lctw.report <sweep dir | W&B group>``: see :mod:`lctw.report`."""

import logging

from lctw.report import main

logging.basicConfig(level=logging.INFO, format="%(message)s")
main()
