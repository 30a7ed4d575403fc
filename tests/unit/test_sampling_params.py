"""SamplingParams refuses what no range check catches: NaN, infinities, booleans posing as numbers."""

import math

import pytest

from services.common.sampling_params import BeamSearchParams, SamplingParams

FLOATS = ["temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"]


@pytest.mark.parametrize("name", FLOATS)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, "0.5", None, True])
def test_non_finite_or_non_numeric_floats_are_refused_by_name(name, value):
    with pytest.raises(ValueError, match=rf"^{name} must be a finite number"):
        SamplingParams(**{name: value})


@pytest.mark.parametrize("value", [True, 2.0, "2"])
def test_n_must_be_a_true_integer(value):
    with pytest.raises(ValueError, match="^n must be an integer"):
        SamplingParams(n=value)


def test_ordinary_values_still_pass():
    p = SamplingParams(n=3, temperature=0.7, top_p=0.9, min_p=0.05, repetition_penalty=1.1,
                       presence_penalty=-0.5, frequency_penalty=0.5)
    assert p.n == 3 and not p.greedy


@pytest.mark.parametrize("name", ["temperature", "length_penalty"])
def test_beam_search_floats_are_finite(name):
    with pytest.raises(ValueError, match=rf"^{name} must be a finite number"):
        BeamSearchParams(beam_width=2, max_tokens=4, **{name: math.nan})
