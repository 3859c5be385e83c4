"""SLO controller: latency windows and the dimmer policies (off, fixed, aimd, predictive, and
ladder: predictive with the step token budget and the running-batch cap).

Every policy module is imported here, so the registry in `brownout.control.base` holds every
policy as soon as any part of the package is imported (`brownout.config` reads it).
"""

from brownout.control.base import (Controller, PlannedStep, QueueState, make_controller,
                                   policy_names, register_policy)
from brownout.control.ladder import LadderController
from brownout.control.policies import AIMDController, FixedController, OffController
from brownout.control.predictive import PredictiveController
from brownout.control.tuning import PredictiveTuning

__all__ = ["AIMDController", "Controller", "FixedController", "LadderController", "OffController", "PlannedStep",
           "PredictiveController", "PredictiveTuning", "QueueState", "make_controller", "policy_names",
           "register_policy"]
