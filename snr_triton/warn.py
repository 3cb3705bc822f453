"""Warnings that point at the user's line, however deep in the optimizer they are raised.

A fixed stacklevel is right for one call path only: the backend's fallback warning is raised
from the constructor (under torch.optim.Optimizer.__init__), from add_param_group and from a
step (under torch's no_grad and step-hook wrappers), each at another depth. Python 3.12's
`skip_file_prefixes` does this; the walk below works on 3.10 and 3.11 too.
"""

from __future__ import annotations

import os
import sys
import warnings

import torch

# this package and torch (Optimizer.__init__, add_param_group, the step's wrappers)
_INSIDE = tuple(os.path.dirname(os.path.abspath(f)) + os.sep for f in (__file__, torch.__file__))


def warn_user(message: str) -> None:
    """warnings.warn, attributed to the first caller outside snr_triton and torch."""
    level, frame = 2, sys._getframe(1)  # stacklevel 2: warn_user's caller
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_INSIDE):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, UserWarning, stacklevel=level)
