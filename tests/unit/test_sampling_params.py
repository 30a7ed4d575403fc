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


@pytest.mark.parametrize("kw,field", [
    (dict(top_p=0.5), "top_p"), (dict(top_k=5), "top_k"), (dict(stop=["x"]), "stop"), (dict(min_tokens=1), "min_tokens"),
    (dict(logprobs=1), "logprobs"), (dict(presence_penalty=0.5), "presence_penalty"), (dict(logit_bias={1: 1.0}), "logit_bias"),
    (dict(n=3, best_of=2), "best_of"), (dict(early_stopping="sometimes"), "early_stopping"),
])
def test_use_beam_search_refuses_what_beams_do_not_do(kw, field):
    with pytest.raises(ValueError) as e:
        SamplingParams(use_beam_search=True, **kw)
    assert str(e.value).startswith(field), str(e.value)


def test_use_beam_search_maps_to_the_engines_beam_params_and_round_trips_protobuf():
    from services.common.convert import params_from_pb, params_to_pb

    sp = SamplingParams(n=2, best_of=4, use_beam_search=True, length_penalty=0.5, early_stopping="never",
                        max_tokens=None, temperature=0.7, ignore_eos=True)
    bp = sp.beam_search_params(100)
    assert (bp.beam_width, bp.n, bp.max_tokens, bp.length_penalty, bp.early_stopping, bp.temperature, bp.ignore_eos) == \
        (4, 2, 100, 0.5, "never", 0.7, True)
    back = params_from_pb(params_to_pb(sp))
    assert (back.use_beam_search, back.best_of, back.length_penalty, back.early_stopping, back.n) == (True, 4, 0.5, "never", 2)
    assert params_from_pb(params_to_pb(SamplingParams())).use_beam_search is False
    with pytest.raises(ValueError, match="^best_of"):
        SamplingParams(n=2, best_of=3)  # best_of > n means beams: without use_beam_search it is refused
