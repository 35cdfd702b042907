"""Fused InvaSpread loss: Triton kernels, memory linear in the batch.

Same function as :func:`training.loss.invaspread_loss` (read that module for
the loss itself), computed flash-attention style: the [2N, 2N] similarity
matrix is produced tile by tile in registers and never written to global
memory.  Extra memory is a few [2N] float32 vectors plus the [2N, D] float32
gradient, so a batch of 2N = 65,536 fits where the plain PyTorch loss (several
2N x 2N matrices, 17 GB each in float32) does not; at small batches one launch
replaces a dozen elementwise kernels.

Notation (row i is an anchor, k_j a key, self j = i excluded everywhere)::

    s_ij   = a_i . k_j / tau                 pos(i) = (i + N) mod 2N,  w = neg_weight
    log Z_i = logsumexp_{j != i} (s_ij + [j neg] log w)
    x_ij   = s_ij - log Z_i,   p_ij = exp(x_ij),   q_ij = exp(s_ij + [j neg] log w - log Z_i)
    l_i    = -( s_i,pos - log Z_i + w * sum_{j neg} log(1 - p_ij) )
    L      = (1 / 2N) sum_i l_i

``log(1 - p)`` is evaluated at ``x`` clamped to ``<= -tiny`` exactly as the
reference does; a clamped entry gets no gradient.  With
``r_ij = p_ij / (1 - p_ij)`` on unclamped negatives (0 elsewhere) and
``T_i = sum_j r_ij`` the derivative of one row is (sum_k q_ik = 1)::

    dl_i/ds_ik = q_ik (1 - w T_i) - [k = pos(i)] + w r_ik

so ``dL/da_i = sum_k g_ik k_k / tau`` and, when keys carry gradient,
``dL/dk_k += sum_i g_ik a_i / tau`` with ``g = (dl/ds) / 2N``.

Kernels (one program per block of rows or keys):

* forward: pass 1 over key tiles computes ``log Z`` by online log-sum-exp and
  picks out ``s_pos``; pass 2 recomputes the tiles for ``sum log(1 - p)`` and
  ``T``.  Per-row outputs: loss, ``log Z`` and ``T`` ([M] float32 each).
* backward rows: recompute each tile, form ``g``, accumulate ``g @ K``.
* backward keys (only when keys need gradient): the same per key block over
  anchor tiles, accumulating ``g^T @ A``.

Inputs may be float32, bfloat16 or float16; products accumulate in float32
(float32 inputs use 3xTF32 tensor-core products on CUDA, near float32
accuracy) and all softmax statistics are float32.  ``D <= 512``.  On CPU the
kernels run only in Triton's interpreter (``TRITON_INTERPRET=1`` set before
``triton`` is imported, as ``tests/conftest.py`` does); otherwise use the
reference loss there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from training.loss import check_loss_args

try:  # triton ships with CUDA builds of torch; absent on some CPU-only installs
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only without triton
    triton = None
    tl = None

__all__ = [
    "MAX_DIM",
    "FusedLossConfig",
    "TileConfig",
    "default_config",
    "fused_invaspread_loss",
    "fused_invaspread_loss_rows",
    "fused_loss_available",
]

MAX_DIM = 512
_TINY = float(torch.finfo(torch.float32).tiny)  # the reference's clamp, float32 inputs


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class TileConfig:
    """Block shape and launch options of one kernel (block sizes are powers of two >= 16)."""

    block_m: int  # anchor rows per tile
    block_n: int  # key rows per tile
    num_warps: int = 4
    num_stages: int = 2


@dataclass(frozen=True)
class FusedLossConfig:
    """Tiles of the three kernels, the D chunk, and the float32 product mode.

    ``block_d`` is the largest chunk of the feature dimension held at once;
    larger ``D`` is processed in chunks.  ``dot_precision`` applies to float32
    inputs only: ``"tf32x3"`` (default, ~float32 accuracy on tensor cores) or
    ``"ieee"`` (exact float32 FMA, slower).
    """

    forward: TileConfig
    backward_rows: TileConfig
    backward_keys: TileConfig
    block_d: int = 128
    dot_precision: str = "tf32x3"


def default_config(dim: int, dtype: torch.dtype, interpreted: bool = False) -> FusedLossConfig:
    """Tiles used when ``fused_invaspread_loss`` is not given a config.

    The interpreter runs each program in Python over numpy blocks, so fewer,
    larger tiles are faster there.  On GPU (D <= 128) the tiles are the
    fastest of ``benchmarks/loss_bench.py --tune`` on an H200 at 2N = 16384
    (candidates: the tiles that compile without, or with few, register
    spills for sm_90); float32 (3xTF32 products) needs more registers than
    bfloat16 / float16.
    """
    if interpreted:
        t = TileConfig(128, 128)
        return FusedLossConfig(t, t, t, block_d=128, dot_precision="ieee")
    wide = _pow2(dim) > 128  # D > 128: chunked products, small tiles
    if dtype == torch.float32:
        if wide:
            t = TileConfig(32, 32, num_warps=8, num_stages=2)
            return FusedLossConfig(t, t, t, block_d=64)
        return FusedLossConfig(
            forward=TileConfig(128, 64, num_warps=8, num_stages=1),
            backward_rows=TileConfig(128, 32, num_warps=8, num_stages=1),
            backward_keys=TileConfig(64, 32, num_warps=8, num_stages=2),
        )
    if wide:
        t = TileConfig(64, 32, num_warps=8, num_stages=2)
        return FusedLossConfig(t, t, t)
    return FusedLossConfig(
        forward=TileConfig(128, 64, num_warps=8, num_stages=2),
        backward_rows=TileConfig(64, 64, num_warps=4, num_stages=2),
        backward_keys=TileConfig(64, 32, num_warps=4, num_stages=2),
    )


def _check_config(cfg: FusedLossConfig) -> None:
    """ValueError for tiles Triton cannot build (tl.dot needs power-of-two sides >= 16)."""
    for name in ("forward", "backward_rows", "backward_keys"):
        t = getattr(cfg, name)
        for v in (t.block_m, t.block_n):
            if v < 16 or v & (v - 1):
                raise ValueError(f"config.{name}: block sizes must be powers of two >= 16, got {t}")
        if t.num_warps not in (1, 2, 4, 8, 16) or t.num_stages < 1:
            raise ValueError(f"config.{name}: num_warps must be 1..16 (power of two), num_stages >= 1")
    if cfg.block_d < 16 or cfg.block_d & (cfg.block_d - 1):
        raise ValueError(f"config.block_d must be a power of two >= 16, got {cfg.block_d}")
    if cfg.dot_precision not in ("tf32x3", "ieee", "tf32"):
        raise ValueError(f"config.dot_precision must be 'tf32x3', 'ieee' or 'tf32', got {cfg.dot_precision!r}")


def _pow2(x: int) -> int:
    return 1 << max(4, (int(x) - 1).bit_length())  # >= 16 (tl.dot needs K >= 16)


def _clip_tile(t: TileConfig, rows: int, keys: int) -> TileConfig:
    """Shrink tiles to the problem (a 6-row batch does not need 64-row tiles)."""
    return replace(t, block_m=min(t.block_m, _pow2(rows)), block_n=min(t.block_n, _pow2(keys)))


def _is_interpreted() -> bool:
    return triton is not None and type(_fwd_kernel).__name__ == "InterpretedFunction"


def fused_loss_available(device: torch.device | str) -> tuple[bool, str]:
    """``(True, "")`` if the fused loss can run on ``device``, else ``(False, why)``."""
    device = torch.device(device)
    if triton is None:
        return False, (
            "the fused loss needs the 'triton' package, which is not installed; "
            "use the reference loss (--loss reference)"
        )
    if device.type == "cuda":
        return True, ""
    if device.type == "cpu" and _is_interpreted():
        return True, ""
    return False, (
        f"the fused loss runs Triton kernels and needs a CUDA device, but the features are on "
        f"'{device.type}'; use the reference loss there (--loss reference, "
        f"training.loss.invaspread_loss), or set TRITON_INTERPRET=1 before Python starts to run "
        f"the kernels in Triton's (slow) interpreter"
    )


# --------------------------------------------------------------------------- kernels

if triton is not None:

    @triton.jit
    def _load_rows(ptr, idx, ok, d0, D, stride, BLOCK_D: tl.constexpr):
        """Rows ``idx`` (masked by ``ok``), columns ``d0 .. d0+BLOCK_D`` of a row-major matrix."""
        d = d0 + tl.arange(0, BLOCK_D)
        return tl.load(
            ptr + idx[:, None] * stride + d[None, :], mask=ok[:, None] & (d[None, :] < D), other=0.0
        )

    @triton.jit
    def _mm(x, y, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
        """float32 product x @ y.  ``UPCAST`` multiplies in float32: Triton's interpreter
        keeps bfloat16 as raw uint16 bits and its tl.dot would multiply those."""
        if UPCAST:
            return tl.dot(x.to(tl.float32), y.to(tl.float32), input_precision="ieee")
        else:
            return tl.dot(x, y, input_precision=DOT_PREC)

    @triton.jit
    def _scores(a, k, A, K, rows, cols, row_ok, col_ok, D, stride_a, stride_k, inv_tau,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                NUM_DC: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
        """[BLOCK_M, BLOCK_N] float32 tile s = A[rows] . K[cols]^T / tau.

        With one D chunk the caller passes the loaded tiles ``a`` and ``k``;
        otherwise the chunks are loaded here and accumulated.
        """
        if NUM_DC == 1:
            acc = _mm(a, tl.trans(k), UPCAST, DOT_PREC)
        else:
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for c in range(NUM_DC):
                a_c = _load_rows(A, rows, row_ok, c * BLOCK_D, D, stride_a, BLOCK_D)
                k_c = _load_rows(K, cols, col_ok, c * BLOCK_D, D, stride_k, BLOCK_D)
                acc += _mm(a_c, tl.trans(k_c), UPCAST, DOT_PREC)
        return acc * inv_tau

    @triton.jit
    def _key_tile_scores(a, A, K, rows, cols, row_ok, col_ok, D, stride_a, stride_k, inv_tau,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                         NUM_DC: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
        """Scores of a loaded row block ``a`` against the key tile ``cols`` (loads the keys)."""
        if NUM_DC == 1:
            k = _load_rows(K, cols, col_ok, 0, D, stride_k, BLOCK_D)
            s = _scores(a, k, A, K, rows, cols, row_ok, col_ok, D, stride_a, stride_k, inv_tau,
                        BLOCK_M, BLOCK_N, BLOCK_D, NUM_DC, UPCAST, DOT_PREC)
        else:  # chunks are loaded inside _scores; a stands in for the unused tile
            s = _scores(a, a, A, K, rows, cols, row_ok, col_ok, D, stride_a, stride_k, inv_tau,
                        BLOCK_M, BLOCK_N, BLOCK_D, NUM_DC, UPCAST, DOT_PREC)
        return s

    @triton.jit
    def _one_minus_exp(x):
        """``1 - exp(x)`` for ``x < 0``, accurate as ``x -> 0`` (Taylor series of -expm1)."""
        ser = -x * (1.0 + x * (0.5 + x * (1.0 / 6.0 + x * (1.0 / 24.0 + x * (
            1.0 / 120.0 + x * (1.0 / 720.0 + x * (1.0 / 5040.0 + x * (1.0 / 40320.0))))))))
        return tl.where(x > -0.34657359027997264, ser, 1.0 - tl.exp(x))

    @triton.jit
    def _log_one_minus(e, om):
        """``log(1 - e)`` given ``e`` and ``om = 1 - e`` (Taylor series of log1p for small e)."""
        y = -e
        ser = y * (1.0 + y * (-0.5 + y * (1.0 / 3.0 + y * (-0.25 + y * (0.2 + y * (-1.0 / 6.0))))))
        return tl.where(e < 0.03125, ser, tl.log(om))

    @triton.jit
    def _row_stats(IDX, LSE, TSUM, rows, row_ok, HALF_N, TWO_N, w):
        self_idx = tl.load(IDX + rows, mask=row_ok, other=-1)
        pos_idx = tl.where(row_ok, (self_idx + HALF_N) % TWO_N, -1)
        lse = tl.load(LSE + rows, mask=row_ok, other=0.0)
        coef = 1.0 - w * tl.load(TSUM + rows, mask=row_ok, other=0.0)
        return self_idx, pos_idx, lse, coef

    @triton.jit
    def _grad_tile(s, lse, coef, self_idx, pos_idx, rows_ok, cols, col_ok, w, TINY):
        """dl_i/ds_ij (unscaled) on one tile; 0 on self, padding and out-of-range entries."""
        is_pos = cols[None, :] == pos_idx[:, None]
        valid = rows_ok[:, None] & col_ok[None, :] & (cols[None, :] != self_idx[:, None])
        is_neg = valid & (~is_pos)
        x = s - lse[:, None]
        e = tl.exp(tl.where(valid, x, 0.0))
        q = tl.where(is_neg, w * e, e)
        xc = tl.minimum(x, -TINY)
        r = tl.where(is_neg & (x <= -TINY), tl.minimum(e, 1.0) / _one_minus_exp(xc), 0.0)
        g = q * coef[:, None] - is_pos.to(tl.float32) + w * r
        return tl.where(valid, g, 0.0)

    @triton.jit(do_not_specialize=["M", "TWO_N", "HALF_N"])  # one build for every batch size
    def _fwd_kernel(A, K, IDX, LOSS, LSE, TSUM,
                    M, TWO_N, HALF_N, D, stride_a, stride_k,
                    inv_tau, log_w, w, TINY,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                    NUM_DC: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
        pid = tl.program_id(0)
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        self_idx = tl.load(IDX + rows, mask=row_ok, other=-1)
        pos_idx = tl.where(row_ok, (self_idx + HALF_N) % TWO_N, -1)
        a = _load_rows(A, rows, row_ok, 0, D, stride_a, BLOCK_D)

        # pass 1: log Z by online log-sum-exp, and the positive logit
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        s_pos = tl.zeros([BLOCK_M], tl.float32)
        for n0 in range(0, TWO_N, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            col_ok = cols < TWO_N
            s = _key_tile_scores(a, A, K, rows, cols, row_ok, col_ok, D, stride_a, stride_k, inv_tau,
                                 BLOCK_M, BLOCK_N, BLOCK_D, NUM_DC, UPCAST, DOT_PREC)
            is_pos = cols[None, :] == pos_idx[:, None]
            valid = col_ok[None, :] & (cols[None, :] != self_idx[:, None])
            z = tl.where(valid, tl.where(is_pos, s, s + log_w), float("-inf"))
            s_pos += tl.sum(tl.where(is_pos, s, 0.0), axis=1)
            m_new = tl.maximum(m_i, tl.max(z, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(z - m_safe[:, None]), axis=1)
            m_i = m_new
        lse = tl.where(row_ok, m_i + tl.log(l_i), 0.0)

        # pass 2: sum_neg log(1 - p) and T = sum_neg p / (1 - p)
        l1m = tl.zeros([BLOCK_M], tl.float32)
        t_sum = tl.zeros([BLOCK_M], tl.float32)
        for n0 in range(0, TWO_N, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            col_ok = cols < TWO_N
            s = _key_tile_scores(a, A, K, rows, cols, row_ok, col_ok, D, stride_a, stride_k, inv_tau,
                                 BLOCK_M, BLOCK_N, BLOCK_D, NUM_DC, UPCAST, DOT_PREC)
            is_neg = (row_ok[:, None] & col_ok[None, :] & (cols[None, :] != self_idx[:, None])
                      & (cols[None, :] != pos_idx[:, None]))
            x = s - lse[:, None]
            xc = tl.minimum(tl.where(is_neg, x, -1.0), -TINY)
            e = tl.exp(xc)
            om = _one_minus_exp(xc)
            l1m += tl.sum(tl.where(is_neg, _log_one_minus(e, om), 0.0), axis=1)
            t_sum += tl.sum(tl.where(is_neg & (x <= -TINY), e / om, 0.0), axis=1)
        loss = -(s_pos - lse + w * l1m)
        tl.store(LOSS + rows, loss, mask=row_ok)
        tl.store(LSE + rows, lse, mask=row_ok)
        tl.store(TSUM + rows, t_sum, mask=row_ok)

    @triton.jit(do_not_specialize=["M", "TWO_N", "HALF_N"])  # one build for every batch size
    def _bwd_rows_kernel(A, K, IDX, LSE, TSUM, GRAD_OUT, DA,
                         M, TWO_N, HALF_N, D, stride_a, stride_k, stride_da,
                         inv_tau, w, TINY, out_scale,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                         NUM_DC: tl.constexpr, ROW_SCALE: tl.constexpr, UPCAST: tl.constexpr,
                         DOT_PREC: tl.constexpr):
        """DA[rows, chunk] = out_scale * grad_out * sum_j g_ij K[j, chunk] / tau."""
        pid = tl.program_id(0)
        d0 = tl.program_id(1) * BLOCK_D
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        self_idx, pos_idx, lse, coef = _row_stats(IDX, LSE, TSUM, rows, row_ok, HALF_N, TWO_N, w)
        a = _load_rows(A, rows, row_ok, 0, D, stride_a, BLOCK_D)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for n0 in range(0, TWO_N, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            col_ok = cols < TWO_N
            k = _load_rows(K, cols, col_ok, d0, D, stride_k, BLOCK_D)
            s = _scores(a, k, A, K, rows, cols, row_ok, col_ok, D, stride_a, stride_k, inv_tau,
                        BLOCK_M, BLOCK_N, BLOCK_D, NUM_DC, UPCAST, DOT_PREC)
            g = _grad_tile(s, lse, coef, self_idx, pos_idx, row_ok, cols, col_ok, w, TINY)
            if ROW_SCALE:  # float16: scale each row to max |g| = 1 before rounding
                mx = tl.max(tl.abs(g), axis=1)
                mx = tl.where(mx > 0.0, mx, 1.0)
                acc += _mm((g / mx[:, None]).to(k.dtype), k, UPCAST, DOT_PREC) * mx[:, None]
            else:
                acc += _mm(g.to(k.dtype), k, UPCAST, DOT_PREC)
        scale = tl.load(GRAD_OUT).to(tl.float32) * out_scale * inv_tau
        d = d0 + tl.arange(0, BLOCK_D)
        tl.store(DA + rows[:, None] * stride_da + d[None, :], acc * scale,
                 mask=row_ok[:, None] & (d[None, :] < D))

    @triton.jit(do_not_specialize=["M", "TWO_N", "HALF_N"])  # one build for every batch size
    def _bwd_keys_kernel(A, K, IDX, LSE, TSUM, GRAD_OUT, DK,
                         M, TWO_N, HALF_N, D, stride_a, stride_k, stride_dk,
                         inv_tau, w, TINY, out_scale,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                         NUM_DC: tl.constexpr, ROW_SCALE: tl.constexpr, UPCAST: tl.constexpr,
                         DOT_PREC: tl.constexpr,
                         ACCUMULATE: tl.constexpr):
        """DK[cols, chunk] (+)= out_scale * grad_out * sum_i g_ij A[i, chunk] / tau."""
        pid = tl.program_id(0)
        d0 = tl.program_id(1) * BLOCK_D
        cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < TWO_N
        k = _load_rows(K, cols, col_ok, 0, D, stride_k, BLOCK_D)
        acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        for m0 in range(0, M, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            row_ok = rows < M
            self_idx, pos_idx, lse, coef = _row_stats(IDX, LSE, TSUM, rows, row_ok, HALF_N, TWO_N, w)
            a = _load_rows(A, rows, row_ok, d0, D, stride_a, BLOCK_D)
            s = _scores(a, k, A, K, rows, cols, row_ok, col_ok, D, stride_a, stride_k, inv_tau,
                        BLOCK_M, BLOCK_N, BLOCK_D, NUM_DC, UPCAST, DOT_PREC)
            g = tl.trans(_grad_tile(s, lse, coef, self_idx, pos_idx, row_ok, cols, col_ok, w, TINY))
            if ROW_SCALE:
                mx = tl.max(tl.abs(g), axis=1)
                mx = tl.where(mx > 0.0, mx, 1.0)
                acc += _mm((g / mx[:, None]).to(a.dtype), a, UPCAST, DOT_PREC) * mx[:, None]
            else:
                acc += _mm(g.to(a.dtype), a, UPCAST, DOT_PREC)
        scale = tl.load(GRAD_OUT).to(tl.float32) * out_scale * inv_tau
        d = d0 + tl.arange(0, BLOCK_D)
        ptrs = DK + cols[:, None] * stride_dk + d[None, :]
        mask = col_ok[:, None] & (d[None, :] < D)
        out = acc * scale
        if ACCUMULATE:
            out += tl.load(ptrs, mask=mask, other=0.0)
        tl.store(ptrs, out, mask=mask)


# --------------------------------------------------------------------------- launchers


def _geometry(dim: int, cfg: FusedLossConfig) -> tuple[int, int]:
    """(BLOCK_D, NUM_DC): the D chunk and how many chunks cover D."""
    block_d = min(_pow2(dim), _pow2(cfg.block_d))
    return block_d, triton.cdiv(max(dim, 1), block_d)


def _upcast(x: Tensor) -> bool:
    """Multiply bfloat16 tiles in float32 under the interpreter (see ``_mm``)."""
    return x.dtype == torch.bfloat16 and _is_interpreted()


def _launch_forward(
    a: Tensor, k: Tensor, idx: Tensor, inv_tau: float, w: float, cfg: FusedLossConfig
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-anchor (loss, log Z, T), each [M] float32."""
    m, dim = a.shape
    two_n = k.shape[0]
    loss, lse, tsum = (torch.empty(m, dtype=torch.float32, device=a.device) for _ in range(3))
    t = _clip_tile(cfg.forward, m, two_n)
    block_d, num_dc = _geometry(dim, cfg)
    _fwd_kernel[(triton.cdiv(m, t.block_m),)](
        a, k, idx, loss, lse, tsum,
        m, two_n, two_n // 2, dim, a.stride(0), k.stride(0),
        inv_tau, math.log(w), w, _TINY,
        BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_D=block_d, NUM_DC=num_dc,
        UPCAST=_upcast(a), DOT_PREC=cfg.dot_precision, num_warps=t.num_warps, num_stages=t.num_stages,
    )
    return loss, lse, tsum


def _launch_backward(
    a: Tensor, k: Tensor, idx: Tensor, lse: Tensor, tsum: Tensor, grad_out: Tensor,
    inv_tau: float, w: float, out_scale: float, cfg: FusedLossConfig,
    need_da: bool, need_dk: bool, shared: bool,
) -> tuple[Tensor | None, Tensor | None]:
    """float32 gradients (dA [M, D], dK [2N, D]); with ``shared`` dK is added into dA."""
    m, dim = a.shape
    two_n = k.shape[0]
    block_d, num_dc = _geometry(dim, cfg)
    row_scale = a.dtype == torch.float16
    grad_out = grad_out.reshape(1).contiguous()
    common = dict(BLOCK_D=block_d, NUM_DC=num_dc, ROW_SCALE=row_scale, UPCAST=_upcast(a),
                  DOT_PREC=cfg.dot_precision)
    da = dk = None
    if need_da or shared:
        da = torch.empty(m, dim, dtype=torch.float32, device=a.device)
        t = _clip_tile(cfg.backward_rows, m, two_n)
        _bwd_rows_kernel[(triton.cdiv(m, t.block_m), num_dc)](
            a, k, idx, lse, tsum, grad_out, da,
            m, two_n, two_n // 2, dim, a.stride(0), k.stride(0), da.stride(0),
            inv_tau, w, _TINY, out_scale,
            BLOCK_M=t.block_m, BLOCK_N=t.block_n, num_warps=t.num_warps, num_stages=t.num_stages,
            **common,
        )
    if need_dk:
        target = da if shared else torch.empty(two_n, dim, dtype=torch.float32, device=a.device)
        t = _clip_tile(cfg.backward_keys, m, two_n)
        _bwd_keys_kernel[(triton.cdiv(two_n, t.block_n), num_dc)](
            a, k, idx, lse, tsum, grad_out, target,
            m, two_n, two_n // 2, dim, a.stride(0), k.stride(0), target.stride(0),
            inv_tau, w, _TINY, out_scale,
            BLOCK_M=t.block_m, BLOCK_N=t.block_n, num_warps=t.num_warps, num_stages=t.num_stages,
            ACCUMULATE=shared, **common,
        )
        if not shared:
            dk = target
    return da, dk


class _FusedBatchLoss(torch.autograd.Function):
    """Mean loss of a [2N, D] batch; keys are the features themselves (detached or not)."""

    @staticmethod
    def forward(ctx, features: Tensor, temperature: float, neg_weight: float, detach_keys: bool,
                cfg: FusedLossConfig) -> Tensor:
        f = features.contiguous()
        idx = torch.arange(f.shape[0], device=f.device, dtype=torch.int32)
        loss, lse, tsum = _launch_forward(f, f, idx, 1.0 / temperature, neg_weight, cfg)
        ctx.save_for_backward(f, idx, lse, tsum)
        ctx.args = (temperature, neg_weight, detach_keys, cfg)
        return loss.sum() / f.shape[0]

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        f, idx, lse, tsum = ctx.saved_tensors
        temperature, neg_weight, detach_keys, cfg = ctx.args
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        da, _ = _launch_backward(
            f, f, idx, lse, tsum, grad_out, 1.0 / temperature, neg_weight, 1.0 / f.shape[0], cfg,
            need_da=True, need_dk=not detach_keys, shared=True,
        )
        return da.to(f.dtype), None, None, None, None


class _FusedRowsLoss(torch.autograd.Function):
    """Summed loss of some anchor rows against a whole batch of keys."""

    @staticmethod
    def forward(ctx, anchors: Tensor, keys: Tensor, index: Tensor, temperature: float,
                neg_weight: float, cfg: FusedLossConfig) -> Tensor:
        a = anchors.contiguous()
        k = keys.contiguous()
        idx = index.to(torch.int32).contiguous()
        loss, lse, tsum = _launch_forward(a, k, idx, 1.0 / temperature, neg_weight, cfg)
        ctx.save_for_backward(a, k, idx, lse, tsum)
        ctx.args = (temperature, neg_weight, cfg)
        return loss.sum()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        a, k, idx, lse, tsum = ctx.saved_tensors
        temperature, neg_weight, cfg = ctx.args
        need_da, need_dk = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_da or need_dk):
            return None, None, None, None, None, None
        da, dk = _launch_backward(
            a, k, idx, lse, tsum, grad_out, 1.0 / temperature, neg_weight, 1.0, cfg,
            need_da=need_da, need_dk=need_dk, shared=False,
        )
        return (da.to(a.dtype) if need_da else None, dk.to(k.dtype) if need_dk else None,
                None, None, None, None)


# --------------------------------------------------------------------------- public API


def _check_common(x: Tensor, name: str, temperature: float, neg_weight: float) -> None:
    ok, why = fused_loss_available(x.device)
    if not ok:
        raise RuntimeError(why)
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(
            f"the fused loss takes float32, bfloat16 or float16 {name}, got {x.dtype}; "
            f"use training.loss.invaspread_loss (--loss reference) for other dtypes"
        )
    if x.shape[-1] > MAX_DIM:
        raise ValueError(
            f"the fused loss supports feature dimension D <= {MAX_DIM}, got D = {x.shape[-1]}; "
            f"use the reference loss (--loss reference) or a smaller embedding_dim"
        )
    if not (math.isfinite(temperature) and math.isfinite(neg_weight)):
        raise ValueError(f"temperature and neg_weight must be finite, got {temperature}, {neg_weight}")


def fused_invaspread_loss(
    features: Tensor,
    temperature: float = 0.1,
    detach_keys: bool = True,
    neg_weight: float = 1.0,
    *,
    config: FusedLossConfig | None = None,
) -> Tensor:
    """InvaSpread loss of a batch of two views, fused (same contract as ``invaspread_loss``).

    Args:
        features: [2N, D] rows (view 1 of N images, then view 2), float32 /
            bfloat16 / float16, D <= 512, on CUDA (or CPU under TRITON_INTERPRET=1).
        temperature: tau > 0.
        detach_keys: True = the authors' gradient (keys detached); False = full gradient.
        neg_weight: w >= 0 (w = 0 gives a constant 0 without gradient, as the reference).
        config: tiles and product mode (default: :func:`default_config`).

    Returns:
        Scalar float32 tensor, the mean over the 2N anchors.
    """
    check_loss_args(features, temperature, neg_weight)
    _check_common(features, "features", float(temperature), float(neg_weight))
    if neg_weight == 0:
        return torch.zeros((), dtype=torch.float32, device=features.device)
    cfg = config or default_config(features.shape[1], features.dtype, _is_interpreted())
    _check_config(cfg)
    return _FusedBatchLoss.apply(features, float(temperature), float(neg_weight), bool(detach_keys), cfg)


def fused_invaspread_loss_rows(
    anchors: Tensor,
    keys: Tensor,
    anchor_index: Tensor,
    temperature: float = 0.1,
    neg_weight: float = 1.0,
    *,
    config: FusedLossConfig | None = None,
) -> Tensor:
    """Summed loss of the given anchors (same contract as ``invaspread_loss_rows``).

    Args:
        anchors: [M, D] anchor rows (with gradient).
        keys: [2N, D] the whole batch; gradient reaches it only if it requires grad
            (detach it for the authors' mode).
        anchor_index: [M] integer, global row of each anchor in ``keys``.
        temperature, neg_weight: as in :func:`fused_invaspread_loss`.

    Returns:
        Scalar float32 tensor ``-sum_i [log P_i + w sum_j log(1 - p_ij)]`` (not divided by 2N).
    """
    check_loss_args(keys, temperature, neg_weight)
    if anchors.dim() != 2 or anchors.shape[1] != keys.shape[1]:
        raise ValueError(
            f"anchors must be [M, D] with the keys' D = {keys.shape[1]}, got {tuple(anchors.shape)}"
        )
    _check_common(anchors, "anchors", float(temperature), float(neg_weight))
    if anchor_index.shape != (anchors.shape[0],) or anchor_index.dtype.is_floating_point:
        raise ValueError(
            f"anchor_index must be an integer vector of length M = {anchors.shape[0]}, "
            f"got {anchor_index.dtype} of shape {tuple(anchor_index.shape)}"
        )
    if keys.device != anchors.device or anchor_index.device != anchors.device:
        raise ValueError("anchors, keys and anchor_index must be on the same device")
    if anchor_index.numel() and (int(anchor_index.min()) < 0 or int(anchor_index.max()) >= keys.shape[0]):
        raise ValueError(f"anchor_index values must lie in [0, {keys.shape[0]})")
    if keys.dtype != anchors.dtype:
        keys = keys.to(anchors.dtype)
    if neg_weight == 0:
        return torch.zeros((), dtype=torch.float32, device=anchors.device)
    cfg = config or default_config(anchors.shape[1], anchors.dtype, _is_interpreted())
    _check_config(cfg)
    return _FusedRowsLoss.apply(anchors, keys, anchor_index, float(temperature), float(neg_weight), cfg)
