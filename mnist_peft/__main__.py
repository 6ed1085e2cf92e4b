"""``python -m mnist_peft``: the same as the ``mnist-peft`` command."""

import sys

from mnist_peft.cli.main import main

sys.exit(main())
