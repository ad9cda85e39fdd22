import keras
import numpy as np
import pytest

from keras_sfp.core import schedules


def test_constant_returns_rate_at_every_epoch():
    s = schedules.Constant(0.3)
    assert [s(e, 10) for e in range(10)] == [0.3] * 10


@pytest.mark.parametrize("rate,epochs", [(0.4, 80), (0.3, 200), (0.5, 16)])
def test_asymptotic_starts_at_zero_reaches_three_quarters_at_an_eighth(rate, epochs):
    s = schedules.Asymptotic(rate, epochs=epochs)
    assert s(0) == 0.0
    assert s(epochs / 8) == pytest.approx(0.75 * rate, rel=1e-6)
    assert s(epochs - 1) == pytest.approx(rate, rel=1e-9)
    values = [s(e) for e in range(epochs)]
    assert np.all(np.diff(values) > 0)


def test_asymptotic_takes_epochs_from_fit_when_not_given():
    s = schedules.Asymptotic(0.4)
    assert s(10, 80) == pytest.approx(schedules.Asymptotic(0.4, epochs=80)(10))
    assert s(79, 80) == pytest.approx(0.4)


@pytest.mark.parametrize(
    "schedule", [schedules.Constant(0.25), schedules.Asymptotic(0.4, epochs=20)]
)
def test_schedules_round_trip_through_keras_serialization(schedule):
    config = keras.saving.serialize_keras_object(schedule)
    restored = keras.saving.deserialize_keras_object(config)
    assert type(restored) is type(schedule)
    assert restored.get_config() == schedule.get_config()
    assert [restored(e, 20) for e in range(20)] == [schedule(e, 20) for e in range(20)]


@pytest.mark.parametrize("rate", [1.0, -0.1, 1.5, "0.3"])
def test_bad_rate_raises_naming_it(rate):
    with pytest.raises(ValueError, match=r"rate="):
        schedules.Asymptotic(rate)
    with pytest.raises(ValueError, match=r"rate="):
        schedules.Constant(rate)


def test_bad_epochs_raises():
    with pytest.raises(ValueError, match=r"epochs=1"):
        schedules.Asymptotic(0.3, epochs=1)


def test_get_builds_named_schedules_and_rejects_others():
    assert isinstance(schedules.get(None, 0.3), schedules.Constant)
    assert isinstance(schedules.get("asymptotic", 0.3), schedules.Asymptotic)
    with pytest.raises(ValueError, match="schedule='linear'"):
        schedules.get("linear", 0.3)
