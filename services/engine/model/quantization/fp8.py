"""FP8 (e4m3) weights: vLLM's `fp8` format (per-tensor weight scales, static or dynamic activations; or FP8 made
at load from a 16-bit checkpoint), Meta's `fbgemm_fp8` (per-channel, dynamic per-token activations with an
upper bound), and the FP8 schemes of compressed-tensors (compressed_tensors.py builds `FP8Method` too).

Loaded form: weight [N, K] float8_e4m3fn, weight_scale [N] float32 (per-tensor scales of fused q/k/v are
spread over their rows), input_scale float32 [] (static) or None (dynamic per token). On Hopper-class GPUs,
by the number of rows M: up to WEIGHT_ONLY_MAX_M (decode) kernels/fp8_gemv.py reads the FP8 weight and
multiplies the 16-bit activations as they are (half bf16's bytes, no activation pass); above it the
activations are quantized per token — by the layer that produced them where the model says so (FP8Input:
the fused add + RMSNorm or SwiGLU), else by kernels/fp8_quant.py (one launch) — and the GEMM is
torch._scaled_mm with row-wise scales or kernels/fp8_w8a8.py (fp8_gemm_quantized), or, for a layer whose
consumer applies the scales itself, cuBLAS's tensor-wise GEMM returning an FP8Output. Elsewhere (CPU) the
weight is dequantized and the activations stay unquantized: the CPU path is the weight-only reference.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from kernels import fp8_fused, fp8_gemv, fp8_w8a8
from kernels.fp8_gemv import fp8_w8a16, reserve_workspace
from kernels.fp8_quant import quantize_fp8_rows
from services.engine.model.layers.linear import weight_param
from services.engine.model.quantization.base import QuantConfig, all_or_none, matches

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448

WEIGHT_ONLY_MAX_M = 16
"""Up to this many rows the weight-only FP8 kernel runs, for shapes kernels/fp8_gemv.py's TUNED does not
settle (bench/quant.py measures the crossover against activation quantization + torch._scaled_mm)."""


def weight_only(m: int, n: int, k: int) -> bool:
    """Whether M rows of x times this [N, K] FP8 weight take the weight-only kernel (else _scaled_mm)."""
    choice = fp8_gemv.TUNED.get((fp8_gemv.m_bucket(m), n, k))
    if choice is None:
        return m <= WEIGHT_ONLY_MAX_M
    return choice != "scaled_mm"


def quantize_weight_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] float -> (fp8 [N, K], float32 scales [N]) with each row's max at FP8_MAX."""
    scale = (w.float().abs().amax(dim=1) / FP8_MAX).clamp(min=1e-12)
    return (w.float() / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def quantize_activation(x: torch.Tensor, static_scale: torch.Tensor | None, ub: float | None):
    """x [M, K] -> (fp8 [M, K], float32 scales [M, 1]): per token (dynamic) or the checkpoint's one scale.
    The torch reference of kernels/fp8_quant.py (which the GPU runs): scale = amax / 448 correctly rounded
    (not amax * (1 / 448)), q = x / scale correctly rounded, then to e4m3 nearest-even; the same bits on
    every device."""
    if static_scale is not None:
        s = static_scale.reshape(1, 1).expand(x.shape[0], 1).contiguous()
    else:
        amax = x.abs().amax(dim=1, keepdim=True).float()
        if ub is not None:
            amax = amax.clamp(max=ub)
        # A tensor divisor, not the Python number: torch's CUDA division by a CPU scalar multiplies by its
        # float32 reciprocal, one ulp off amax / 448 for 71 of bf16's 128 mantissas, while CPU divides.
        s = (amax / torch.full_like(amax, FP8_MAX)).clamp(min=1e-12)
    return (x.float() / s).clamp(-FP8_MAX, FP8_MAX).to(FP8), s


class FP8Input(NamedTuple):
    """A linear layer's input already quantized per token by the layer that produced it (the fused
    add + RMSNorm or SwiGLU kernels), which spares the quantization launch and a pass over the activations."""

    q: torch.Tensor  # [M, K] float8_e4m3fn
    scale: torch.Tensor  # [M, 1] float32


class FP8Output(NamedTuple):
    """An FP8 GEMM's output left without its scales, y = raw * row * col, for a consumer that applies them in its
    own pass (the fused add + RMSNorm, SwiGLU): the GEMM is then cuBLAS's tensor-wise FP8 GEMM with unit
    scales, faster than the row-wise one (bench/fp8.py). Only layers whose `fp8_deferred_scales` the model set
    (it knows their consumer) return one."""

    raw: torch.Tensor  # [M, N] in the model's dtype (float32 on CPU)
    row: torch.Tensor  # [M, 1] float32 per-token activation scales
    col: torch.Tensor  # [1, N] float32 per-channel weight scales

    def dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The scaled output, rounded to `dtype` (default raw's) as the GEMM would have rounded it."""
        return (self.raw.float() * self.row * self.col).to(dtype or self.raw.dtype)


def dense(h):
    """h itself, or an FP8Output with its scales applied."""
    return h.dense() if isinstance(h, FP8Output) else h


FUSE_INPUT_QUANT = True
"""Whether producers quantize for the FP8 layer they feed (bench/fp8.py turns it off to measure the gain)."""
ATTENTION_QUANT = False
"""Whether the decode attention kernel quantizes its output for an FP8 o_proj (kernels/paged_decode.py, fp8_out;
layers/attention.py), sparing kernels/fp8_quant.py's launch per layer. Off: bench/fp8_step.py round 1 (H200, 256
sequences x ~384 tokens, a graph of 8 layers' launches, bits equal) measured attention then the quantizing
launch at 107.7 us per layer against 109.3 with the kernel quantizing (bf16 pool; fp8 pool 94.6 against 109.1):
the launch it spares costs ~4 us, less than what the last program's read-back and the counting add."""
DEFER_SCALES = True
"""Whether layers marked `fp8_deferred_scales` leave their scales to their consumer (bench/fp8.py toggles)."""

DEFER_MAX_M: dict = {(4096, 4096): 4096, (4096, 14336): 4096, (28672, 4096): 4096, (6144, 4096): 4096}
"""(N, K) -> the most rows at which a layer of that shape leaves its scales to its consumer; above it its own
GEMM scales. q/k/v (6144, 4096; the rotary + cache kernel scales, llama.py): bench/fp8.py round 2 (H200) at 256
rows row-wise 15.3 vs tensor-wise 13.0 us, 512: 26.3 vs 21.3; at 8,192 with fast accumulation row-wise wins
(fp8_where round 3: 274.7 vs 287.8 us). bench/fp8_where.py round 2 (H200, 8,192 rows): o row-wise 0.207 vs tensor-wise 0.210 ms, down
0.719 vs 0.728, before the norm's ~6 us of scaling; at 256 rows tensor-wise wins (o 10.6 vs 14.1 us, down
29.5 vs 39.9), and at 2,048 (bench/fp8.py's previous round) too. gate_up: with fast accumulation above 4,096
rows (FAST_ACCUM_MIN_M) its row-wise GEMM wins there (round 3: 1.352 vs 1.472 ms at 8,192 rows)."""

FAST_ACCUM = False
"""cuBLAS's FP8 fast accumulation in torch._scaled_mm on CUDA (`use_fast_accum`): the tensor cores' partial sums
are not promoted to float32 every few K blocks. vLLM's Hopper FP8 CUTLASS kernels run this way
(KernelTmaWarpSpecialized*FP8FastAccum). Off: bench/fp8_where.py round 2 (H200) measured its error against the
float64 product of the same operands at up to 1.1e-2 of the largest output (down, 256 rows; 2.7e-3 without),
for 0.5% of the decode step's GEMMs and 5% of a prefill layer's."""

FAST_ACCUM_MIN_M: int | None = 4097
"""Fast accumulation from this many rows up (prefill-sized GEMMs, above DEFER_MAX_M's bounds: every GEMM there
scales its own output, row-wise) when FAST_ACCUM is off; None: nowhere. bench/fp8_where.py round 3 (H200, 8,192
rows): the layer's four GEMMs 2.697 -> 2.537 ms; error against the float64 product at most 8.7e-3 of the
largest output (qkv 4.6e-3, o 5.6e-3, gate_up 5.0e-3, down 7.4e-3 row-wise; 2.2e-3 ... 2.6e-3 without), within
the 1e-2 bound that keeps it off at decode's 256 rows (down: 1.1e-2, round 2). The bench re-checks and unsets it
where the bound fails."""

_UNIT: dict[torch.device, torch.Tensor] = {}


def _unit(device: torch.device) -> torch.Tensor:
    """A float32 1.0 on the device: the tensor-wise scales of a deferred-scale GEMM (made at load)."""
    if device not in _UNIT:
        _UNIT[device] = torch.ones((), dtype=torch.float32, device=device)
    return _UNIT[device]


def takes_fp8_input(linear, m: int) -> bool:
    """Whether `linear`, fed m rows on the GPU, wants them as FP8Input: an FP8 layer with dynamic per-token
    activation scales whose GEMM at this M takes quantized activations (not the weight-only kernel)."""
    method = getattr(linear, "method", None)
    if not FUSE_INPUT_QUANT or not isinstance(method, FP8Method) or linear.input_scale is not None:
        return False
    n, k = linear.weight.shape
    return on_fp8_gpu(linear.weight) and n % 16 == 0 and k % 16 == 0 and not weight_only(m, n, k)


def on_fp8_gpu(t: torch.Tensor) -> bool:
    """Whether t's device takes the GPU's FP8 paths (activations quantized, FP8 GEMMs): CUDA (the check at load
    refused GPUs without FP8). Elsewhere the weight-only reference runs; tests point this at the CPU to run
    the GPU's paths under the interpreter."""
    return t.is_cuda


def cuda_fp8_ok(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def check_fp8_device(name: str, device: torch.device) -> None:
    if device.type == "cuda" and not cuda_fp8_ok(device):
        cap = torch.cuda.get_device_capability(device)
        raise ValueError(f"quantization {name!r}: FP8 GEMMs need compute capability 8.9 or newer (Ada, Hopper); "
                         f"{device} is {cap[0]}.{cap[1]}")


def fp8_gemm(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, input_scale: torch.Tensor | None,
             ub: float | None) -> torch.Tensor:
    """x [M, K] @ (weight [N, K] fp8 * weight_scale [1, N]).T with x quantized to FP8 (per token, or the static
    scale): torch._scaled_mm with row-wise scales, accumulating in float32. Its output is bfloat16 on CUDA
    (what row-wise scaling supports there), float32 elsewhere."""
    xq, xs = (quantize_fp8_rows if on_fp8_gpu(x) else quantize_activation)(x, input_scale, ub)
    return fp8_gemm_quantized(xq, xs, weight, weight_scale, x.dtype)


def fp8_gemm_quantized(xq: torch.Tensor, xs: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                       dtype: torch.dtype) -> torch.Tensor:
    """(xq [M, K] fp8 * xs [M, 1]) @ (weight [N, K] fp8 * weight_scale [1, N]).T in `dtype`: kernels/fp8_w8a8.py
    where its TUNED table has a config for this (M bucket, N, K) (measured faster), else torch._scaled_mm."""
    m, n, k = xq.shape[0], weight.shape[0], weight.shape[1]
    cfg = fp8_w8a8.TUNED.get((fp8_w8a8.m_bucket(m), n, k)) if on_fp8_gpu(xq) else None
    if cfg is not None:
        return fp8_w8a8.fp8_w8a8(xq, xs, weight, weight_scale, dtype, config=cfg)
    out = torch.bfloat16 if xq.is_cuda else torch.float32
    return torch._scaled_mm(xq, weight.t(), scale_a=xs, scale_b=weight_scale, out_dtype=out,
                            **_fast_accum(xq)).to(dtype)


def _fast_accum(xq: torch.Tensor) -> dict:
    """_scaled_mm's accumulation argument: FAST_ACCUM (or FAST_ACCUM_MIN_M's rows) on CUDA (the CPU kernel has
    no fast mode)."""
    fast = FAST_ACCUM or (FAST_ACCUM_MIN_M is not None and xq.shape[0] >= FAST_ACCUM_MIN_M)
    return {"use_fast_accum": True} if fast and xq.is_cuda else {}


def norm_fp8(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float, ub: float | None,
             x_scales=None) -> FP8Input:
    """The fused add + RMSNorm (Llama's rounding) quantized per token for the FP8 layer that reads it
    (kernels/fp8_fused.py; `residual` updated in place; `x_scales`: x is an FP8Output's raw, as its row, col)."""
    return FP8Input(*fp8_fused.add_rms_norm_fp8(x, residual, weight, eps, ub, x_scales=x_scales))


def swiglu_fp8(gate_up: torch.Tensor, ub: float | None, scales=None) -> FP8Input:
    """silu(gate) * up quantized per token for the FP8 layer that reads it (kernels/fp8_fused.py; `scales`: gate_up
    is an FP8Output's raw, as its row, col)."""
    return FP8Input(*fp8_fused.silu_mul_fp8(gate_up, ub, scales=scales))


class FP8Method:
    """One linear layer's FP8 weight. serialized: the checkpoint holds FP8 tensors (else a 16-bit weight is
    quantized per channel after loading); per_channel: weight_scale [N, 1] (else one per projection);
    static_input: the checkpoint holds input_scale (else dynamic per-token)."""

    def __init__(self, prefix: str, serialized: bool = True, per_channel: bool = False, static_input: bool = False,
                 scale_ub: float | None = None):
        self.prefix, self.serialized, self.per_channel = prefix, serialized, per_channel
        self.static_input, self.scale_ub = static_input, scale_ub

    def create_weights(self, layer, k: int, n: int) -> None:
        if not self.serialized:
            layer.weight = weight_param(torch.empty(n, k), out_dim=0, in_dim=1)
            return
        layer.weight = weight_param(torch.empty(n, k, dtype=FP8), out_dim=0, in_dim=1)
        if self.per_channel:
            layer.weight_scale = weight_param(torch.empty(n, 1, dtype=torch.float32), out_dim=0)
        else:
            layer.weight_scale = weight_param(torch.empty(layer.num_shards, dtype=torch.float32), per_shard=True)
        if self.static_input:
            layer.input_scale = weight_param(torch.empty(layer.num_shards, dtype=torch.float32), per_shard=True)

    def init_dummy(self, layer, g: torch.Generator) -> None:
        """Random FP8 weights in the loaded layout (load_format="dummy")."""
        w = torch.randn(layer.out_features, layer.in_features, generator=g, device=g.device) * 0.02
        self._install(layer, *quantize_weight_per_channel(w), None)

    def process_after_loading(self, layer) -> None:
        if self.serialized:
            w = layer.weight.data
            if self.per_channel:
                scale = layer.weight_scale.data.reshape(-1).float()
            else:  # one scale per projection of a fused layer, spread over that projection's rows
                parts = torch.tensor(layer.output_parts, device=w.device)
                scale = layer.weight_scale.data.float().repeat_interleave(parts)
            in_scale = layer.input_scale.data.float().max() if self.static_input else None  # as vLLM: the max
        else:
            w, scale = quantize_weight_per_channel(layer.weight.data)
            in_scale = None
        if not bool(torch.isfinite(scale).all()) or not bool((scale > 0).all()):
            raise ValueError(f"{self.prefix}: weight_scale holds a zero, negative or non-finite scale")
        self._install(layer, w, scale, in_scale)

    def _install(self, layer, w: torch.Tensor, scale: torch.Tensor, in_scale: torch.Tensor | None) -> None:
        for name, _ in list(layer.named_parameters(recurse=False)):
            if name != "bias":
                delattr(layer, name)
        layer.weight = weight_param(w.contiguous())
        layer.weight_scale = weight_param(scale.float().reshape(1, -1).contiguous())
        layer.input_scale = weight_param(in_scale) if in_scale is not None else None
        for p in (layer.weight, layer.weight_scale, layer.input_scale):
            if p is not None:
                p.quantized = True
        if w.device.type == "cuda":
            _unit(w.device)
            reserve_workspace(w.device, w.shape[0])
            fp8_w8a8.reserve_workspace(w.device, *w.shape)

    @staticmethod
    def use_scaled_mm(x: torch.Tensor, n: int, k: int) -> bool:
        """FP8 GEMMs on the GPU (the device check refused GPUs without them); _scaled_mm wants K, N % 16."""
        return on_fp8_gpu(x) and n % 16 == 0 and k % 16 == 0

    def apply(self, layer, x: torch.Tensor | FP8Input, bias: torch.Tensor | None):
        if isinstance(x, FP8Input):  # quantized by its producer (takes_fp8_input said so)
            return self._quantized(layer, x.q, x.scale, bias, layer.params_dtype)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        n, k = layer.weight.shape
        if self.use_scaled_mm(x, n, k) and not weight_only(x2.shape[0], n, k):
            if x.dim() == 2 and self._defers(layer, bias, x.shape[0]):
                xq, xs = quantize_fp8_rows(x, layer.input_scale, self.scale_ub) if on_fp8_gpu(x) \
                    else quantize_activation(x, layer.input_scale, self.scale_ub)
                return self._quantized(layer, xq, xs, bias, x.dtype)
            y = fp8_gemm(x2, layer.weight, layer.weight_scale, layer.input_scale, self.scale_ub)
        elif x.is_cuda:  # decode-sized M, or a shape _scaled_mm does not take
            y = fp8_w8a16(x2, layer.weight, layer.weight_scale)
        else:
            w = (layer.weight.float() * layer.weight_scale.reshape(-1, 1)).to(x.dtype)
            y = F.linear(x2, w)
        y = y.reshape(*shape[:-1], n)
        return y if bias is None else y + bias


    @staticmethod
    def _defers(layer, bias, m: int) -> bool:
        """Whether this layer leaves its scales to its consumer at m rows: marked so by the model, no bias, one rank,
        not a float16 model (an unscaled sum of e4m3 products can pass float16's 65504), and m within
        DEFER_MAX_M's bound for its shape."""
        n, k = layer.weight.shape
        return DEFER_SCALES and getattr(layer, "fp8_deferred_scales", False) and bias is None \
            and getattr(layer, "tp_size", 1) == 1 and getattr(layer, "params_dtype", None) != torch.float16 \
            and m <= DEFER_MAX_M.get((n, k), m)

    def _quantized(self, layer, xq, xs, bias, dtype):
        """The GEMM on quantized activations: an FP8Output where the layer defers its scales, else y."""
        if self._defers(layer, bias, xq.shape[0]):
            out = dtype if xq.is_cuda else torch.float32
            unit = _unit(xq.device)
            raw = torch._scaled_mm(xq, layer.weight.t(), scale_a=unit, scale_b=unit, out_dtype=out,
                                   **_fast_accum(xq))
            return FP8Output(raw, xs.reshape(-1, 1), layer.weight_scale.reshape(1, -1))
        y = fp8_gemm_quantized(xq, xs, layer.weight, layer.weight_scale, dtype)
        return y if bias is None else y + bias


class FP8Config(QuantConfig):
    """vLLM's `fp8`: {"quant_method": "fp8", "activation_scheme": "static"|"dynamic", "ignored_layers": [...]}."""

    name = "fp8"

    @classmethod
    def from_config(cls, qc: dict, source: str, serialized: bool = True) -> "FP8Config":
        self = cls()
        self.source, self.serialized = source, serialized
        self.static = self.field(qc, "activation_scheme", str, "dynamic", choices=("static", "dynamic")) == "static"
        if qc.get("weight_block_size") is not None:
            raise ValueError(f"{source}: quantization_config.weight_block_size {qc['weight_block_size']}: block-wise "
                             f"FP8 (DeepSeek-style) is not supported; per-tensor and per-channel are")
        self.skip = list(self.field(qc, "ignored_layers", list, []) or [])
        return self

    def check_device(self, device):
        check_fp8_device(self.name, device)

    def method_for(self, prefix, ckpt_names, layer):
        if all_or_none(prefix, ckpt_names, lambda n: any(matches(n, p) for p in self.skip), "ignored_layers"):
            return None
        return FP8Method(prefix, serialized=self.serialized, static_input=self.static and self.serialized)


class FBGemmFP8Config(QuantConfig):
    """Meta's `fbgemm_fp8`: per-channel weight scales, dynamic per-token activations bounded by
    activation_scale_ub."""

    name = "fbgemm_fp8"

    @classmethod
    def from_config(cls, qc: dict, source: str) -> "FBGemmFP8Config":
        self = cls()
        self.source = source
        ub = self.field(qc, "activation_scale_ub", (int, float), 1200.0)
        if ub <= 0:
            raise ValueError(f"{source}: quantization_config.activation_scale_ub must be positive, got {ub}")
        self.ub = float(ub)
        self.skip = list(self.field(qc, "modules_to_not_convert", list, []) or [])
        return self

    def check_device(self, device):
        check_fp8_device(self.name, device)

    def method_for(self, prefix, ckpt_names, layer):
        if all_or_none(prefix, ckpt_names, lambda n: any(matches(n, p) for p in self.skip), "modules_to_not_convert"):
            return None
        return FP8Method(prefix, per_channel=True, scale_ub=self.ub)
