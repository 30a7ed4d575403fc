"""kernels/fp8_quant.py's quantize_row_fast (RECIP_DIV): y / scale as |y| times the row's reciprocal plus one fused
remainder correction gives the e4m3 bits of the correctly rounded division, for 16-bit y and scale = row_scale(amax).
Checked here in exact rational arithmetic (an independent model of float32 and of the e4m3 conversion) on the values
where it matters (tie-prone scales, the largest and smallest values, random pairs); bench/fp8_div.py checks every
(y, amax) pair on the GPU. The GPU path only: the interpreter's fma rounds twice, so recip_ok keeps it off there."""

from __future__ import annotations

import random
from fractions import Fraction

import numpy as np
import pytest
import torch

from kernels import fp8_quant


def rn32(x: Fraction) -> Fraction:
    """x rounded to float32, nearest even (subnormals down to 2^-149; no overflow in this domain)."""
    if x == 0:
        return Fraction(0)
    sign, a = (-1 if x < 0 else 1), abs(x)
    e = a.numerator.bit_length() - a.denominator.bit_length()
    if Fraction(2) ** e > a:
        e -= 1
    ulp = Fraction(2) ** (max(e, -126) - 23)
    n, rem = divmod(a, ulp)
    if rem * 2 > ulp or (rem * 2 == ulp and n % 2):
        n += 1
    return sign * n * ulp


def e4m3(x: Fraction) -> tuple[bool, Fraction]:
    """(sign, magnitude) of x clamped to 448 and rounded to e4m3, nearest even (3 mantissa bits, min normal 2^-6)."""
    neg, a = x < 0, min(abs(x), Fraction(448))
    e = max(-6, (a.numerator.bit_length() - a.denominator.bit_length()) if a else -6)
    if a and Fraction(2) ** e > a:
        e = max(-6, e - 1)
    step = Fraction(2) ** (e - 3)
    n, rem = divmod(a, step)
    if rem * 2 > step or (rem * 2 == step and n % 2):
        n += 1
    return neg, n * step


def fast(y: Fraction, scale: Fraction, neg: bool) -> tuple[bool, Fraction]:
    """quantize_row_fast's arithmetic, each float32 operation rounded once (fma: one rounding of the exact value)."""
    r = rn32(1 / scale)
    q0 = rn32(y * r)
    q = rn32(rn32(-q0 * scale + y) * r + q0)
    return neg, e4m3(min(q, Fraction(448)))[1]


def exact(y: Fraction, scale: Fraction, neg: bool) -> tuple[bool, Fraction]:
    return neg, e4m3(rn32(y / scale))[1]


def scale_of(amax: Fraction) -> Fraction:
    return max(rn32(amax / 448), rn32(Fraction(1e-12)))


def values16(dtype) -> np.ndarray:
    """Every finite non-negative value of the 16-bit dtype, in bit order, as float64."""
    v = torch.arange(0, 0x8000, dtype=torch.int32).to(torch.int16).view(dtype).double().numpy()
    return v[np.isfinite(v)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reciprocal_division_matches_e4m3_of_the_division(dtype):
    vals = values16(dtype)
    rnd = random.Random(5)
    amaxes = [Fraction(v) for v in vals[-3:]] + [Fraction(v) for v in vals[1:4]]
    # amax a multiple of 7 (448 = 7 * 64): the scale is short, so y / scale lands on e4m3 ties
    amaxes += [Fraction(7 * m, 1) * Fraction(2) ** k for m in (1, 3, 5, 9, 11) for k in (-9, -3, 0, 4)]
    amaxes += [Fraction(v) for v in rnd.sample(list(vals[1:]), 6)]
    checked = 0
    for amax in amaxes:
        s = scale_of(amax)
        ys = [Fraction(v) for v in vals if v <= amax]
        picks = ys if len(ys) <= 200 else rnd.sample(ys, 200) + ys[-20:]
        for y in picks:
            for neg in (False, True):
                assert fast(y, s, neg) == exact(y, s, neg), (dtype, amax, y, neg)
                checked += 1
    # ties where the correction matters: y = scale * (an e4m3 midpoint), as exact values in the domain
    ties = 0
    for amax in amaxes:
        s = scale_of(amax)
        for mid in (Fraction(17, 16), Fraction(9, 8) + Fraction(1, 16), Fraction(3, 2) + Fraction(1, 16)):
            y = s * mid * 64
            if y <= amax and y == Fraction(float(torch.tensor(float(y), dtype=dtype).double())):
                ties += 1
                assert fast(y, s, False) == exact(y, s, False), (dtype, amax, y)
    assert checked > 5000 and ties > 0


def test_the_plain_product_alone_is_not_exact():
    """Why the correction: |y| * r alone can land on an e4m3 tie that the exact quotient is just above (amax 0x1.fp0,
    y 0x1.74p-14, both bfloat16: q0 = 0x1.5p-6 exactly, y / scale = 0x1.500002p-6; one of 22,277 such bfloat16 pairs
    in the exhaustive C run). The correction gets it right."""
    amax, y = Fraction(31, 16), Fraction(0x174, 256) * Fraction(2) ** -14
    s = scale_of(amax)
    r = rn32(1 / s)
    assert e4m3(rn32(y * r)) != e4m3(rn32(y / s))
    assert fast(y, s, False) == exact(y, s, False)


def test_recip_ok_domain(monkeypatch):
    monkeypatch.setattr(fp8_quant, "RECIP_DIV", True)
    assert fp8_quant.recip_ok(torch.bfloat16, True, False)
    assert fp8_quant.recip_ok(torch.float16, True, False)
    assert not fp8_quant.recip_ok(torch.float32, True, False)  # a float32 value is outside the checked domain
    assert not fp8_quant.recip_ok(torch.bfloat16, True, True)  # an amax bound or a static scale: any scale
    assert not fp8_quant.recip_ok(torch.bfloat16, False, False)  # the interpreter / software rounding
    monkeypatch.setattr(fp8_quant, "RECIP_DIV", False)
    assert not fp8_quant.recip_ok(torch.bfloat16, True, False)
