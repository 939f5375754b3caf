"""dpm.core: Smooth Pruning and Self-Rectifying as a small pure-torch library.

Decay Pruning Method (arXiv 2406.03879), docs/method.md sections 2-5. Imports only torch.

Public API:

* :class:`Target`, :class:`Slice`, :func:`channel_targets` -- what to prune (section 2);
* :class:`DecayController` -- admit targets, drive the decay around ``optimizer.step()``
  (or from inside a custom optimizer's step), query decaying / pruned / released, checkpoint;
* :class:`RectifyConfig` -- Self-Rectifying thresholds and rules (section 4);
* :func:`schedule`, :data:`SCHEDULES`, :func:`resolve_decay_steps` -- decay schedules and N.
"""

from .controller import DecayController
from .log import QUANTILES, DecayLog
from .optim_state import zero_state_slices
from .rectify import C_RATE_FORMS, RectifyConfig, c_len, c_rate, release_rule
from .schedules import SCHEDULES, resolve_decay_steps, schedule
from .targets import Slice, Target, channel_targets

__all__ = [
    "DecayController",
    "RectifyConfig",
    "Target",
    "Slice",
    "channel_targets",
    "schedule",
    "SCHEDULES",
    "resolve_decay_steps",
    "DecayLog",
    "QUANTILES",
    "C_RATE_FORMS",
    "c_rate",
    "c_len",
    "release_rule",
    "zero_state_slices",
]
