"""SLO controller: latency windows and the dimmer policies (off, fixed, aimd, predictive)."""

from brownout.control.policies import (AIMDController, Controller, FixedController,
                                       OffController, PlannedStep, make_controller)

__all__ = ["AIMDController", "Controller", "FixedController", "OffController", "PlannedStep",
           "make_controller"]
