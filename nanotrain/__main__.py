"""`python -m nanotrain` and `torchrun -m nanotrain`: the trainer."""
import sys

from nanotrain.train import main

sys.exit(main())
