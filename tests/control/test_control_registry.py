"""The policy registry behind `make_controller` and `--slo-policy`, and the predictive tuning."""

import re

import pytest

from brownout.config import SLOConfig
from brownout.control import (AIMDController, FixedController, LadderController, OffController,
                              PredictiveController, PredictiveTuning, make_controller, policy_names)
from brownout.types import ValidationError


def test_every_policy_is_registered_in_order():
    assert policy_names() == ("off", "fixed", "aimd", "predictive", "ladder")
    kinds = {"off": OffController, "fixed": FixedController, "aimd": AIMDController,
             "predictive": PredictiveController, "ladder": LadderController}
    for name, cls in kinds.items():
        ctrl = make_controller(SLOConfig(policy=name), fixed_tau=0.5)
        assert type(ctrl) is cls and ctrl.name == name
    assert make_controller(SLOConfig(policy="fixed"), fixed_tau=0.5).tau_decode == 0.5


def test_config_names_the_registered_policies():
    with pytest.raises(ValidationError, match=re.escape("must be one of off|fixed|aimd|predictive|ladder")) as exc:
        SLOConfig(policy="pid")
    assert exc.value.field == "slo_policy"


def test_predictive_reads_its_tuning():
    tuning = PredictiveTuning(grid_points=11, max_pressure=0.2, min_samples=5)
    ctrl = PredictiveController(SLOConfig(policy="predictive"), tuning=tuning)
    assert len(ctrl.grid) == 11 and ctrl.max_pressure == 0.2 and ctrl.tuning.min_samples == 5


@pytest.mark.parametrize("field,value", [("refit_every", 0), ("gain_share", 1.5),
                                         ("grid_points", 1), ("z", -1.0), ("min_samples", 2.5)])
def test_bad_tuning_names_the_field(field, value):
    with pytest.raises(ValidationError) as exc:
        PredictiveTuning(**{field: value})
    assert exc.value.field == field
