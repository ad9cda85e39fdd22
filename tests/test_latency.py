import keras
import numpy as np
import pytest

from keras_sfp.latency import timing as latency


def _model():
    inputs = keras.Input((6, 6, 2))
    x = keras.layers.Conv2D(4, 3, activation="relu")(inputs)
    return keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Flatten()(x)))


def test_time_alternately_calls_every_runner_in_turn():
    calls = []
    runners = {key: (lambda key=key: calls.append(key)) for key in "ab"}
    times = latency.time_alternately(runners, runs=3, warmup=2)
    assert calls == ["a", "a", "b", "b"] + ["a", "b"] * 3
    assert set(times) == {"a", "b"} and all(t >= 0 for t in times.values())


@pytest.mark.parametrize("statistic, want", [("median", 3.0), ("min", 1.0)])
def test_time_alternately_summarises_each_runners_times(monkeypatch, statistic, want):
    # A fake clock: runner "a" takes 1, 3 then 8 ms, "b" always 2 ms.
    durations = iter([1e-3, 2e-3, 3e-3, 2e-3, 8e-3, 2e-3])
    clock = {"now": 0.0, "start": True}

    def perf_counter():
        if not clock["start"]:
            clock["now"] += next(durations)
        clock["start"] = not clock["start"]
        return clock["now"]

    monkeypatch.setattr(latency.time, "perf_counter", perf_counter)
    runners = {"a": lambda: None, "b": lambda: None}
    times = latency.time_alternately(runners, runs=3, warmup=0, statistic=statistic)
    assert times["a"] == pytest.approx(want) and times["b"] == pytest.approx(2.0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"runs": 0}, "Received: runs=0"),
        ({"runs": 2, "warmup": -1}, "warmup=-1"),
        ({"runs": 2, "statistic": "mean"}, "Received: statistic='mean'"),
    ],
)
def test_time_alternately_rejects_bad_counts(kwargs, message):
    with pytest.raises(ValueError, match=message):
        latency.time_alternately({"a": lambda: None}, **kwargs)


def test_compiled_predict_and_runner_compute_the_model():
    model = _model()
    x = np.random.default_rng(0).random((5, 6, 6, 2), dtype=np.float32)
    want = keras.ops.convert_to_numpy(model(x, training=False))
    got = latency.compiled_predict(model)(x)
    assert isinstance(got, np.ndarray)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert latency.keras_runner(model, x)() is None
    times = latency.measure_keras({"m": model}, x, runs=2, warmup=1)
    assert list(times) == ["m"] and times["m"] > 0
