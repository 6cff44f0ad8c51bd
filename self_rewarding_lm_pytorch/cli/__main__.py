"""``python -m self_rewarding_lm_pytorch.cli`` (e.g. under ``accelerate launch``)."""

from . import main

raise SystemExit(main())
