"""The scaled problem shared by ADMM-Grad and ALPS: dead inputs out, unit-diagonal scaling, damping.

Steps 1-2 of ADMM-Grad (admm_kernels/methods/admm.py lists the steps): inputs with diag G == 0 ("dead")
are pruned first and kept out of the solve (the data says nothing about them, so pruning them costs no
error); on the live inputs, d = sqrt(diag G) + ε (ε: see SCALE_EPS),
Ĝ = D⁻¹ G D⁻¹ (unit diagonal), V = D Wᵀ (in_live, out), then Ĝ ← Ĝ + λI and B = Ĝ V. Everything is in
the solve's (in, out) layout and in the compute dtype (float32, or float64).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import masks
from .lapack import one_thread

# ε in d = sqrt(diag G) + ε: the seed's absolute 1e-8, scaled down with Grams whose mean diagonal m is
# below 1, ε = 1e-8 · min(1, sqrt(m)), so the result does not depend on the Gram's overall scale (with
# diag G ≈ 1e-14 the absolute 1e-8 outweighed sqrt(diag G) = 1e-7, Ĝ was no longer unit-
# diagonal and ADMM did no better than magnitude pruning). For Grams with m >= 1 (every Gram of summed
# calibration tokens we have seen: SmolLM2's blocks 0-1 have m = 7-950 with 8k-33k tokens) this is
# exactly the seed's d; below, ε stays
# 1e-8 · sqrt(m / G_jj) relative to d_j, as for a Gram of mean diagonal 1.
SCALE_EPS = 1e-8


def scale_eps(mean_diag: float) -> float:
    """ε of the scaling for a live Gram whose mean diagonal entry is `mean_diag` (> 0)."""
    return SCALE_EPS * min(1.0, mean_diag ** 0.5)


@dataclass
class ScaledProblem:
    """One layer in the scaled space.

    weight: the original weight (out, in) in the compute dtype (its dead columns feed the output);
    d: (n_live,) scaling; V: (n_live, out) = D W_liveᵀ; gram: the live Gram (n_live, n_live) until
    `form_scaled_gram` replaces it by Ĝ (then `G_hat`, damped by `damp`); B = Ĝ V once damped; lam: the
    damping λ added to Ĝ's diagonal; dead: bool (in,); live_idx: (n_live,) int64, None without dead inputs.
    """

    weight: torch.Tensor
    d: torch.Tensor
    V: torch.Tensor
    gram: torch.Tensor | None
    dead: torch.Tensor
    live_idx: torch.Tensor | None
    G_hat: torch.Tensor | None = None
    B: torch.Tensor | None = None
    lam: float = 0.0

    @property
    def n_dead(self) -> int:
        return int(self.dead.numel() - self.V.shape[0])

    @property
    def n_live(self) -> int:
        return int(self.V.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)

    def form_scaled_gram(self) -> torch.Tensor:
        """Ĝ = D⁻¹ G D⁻¹ (n_live, n_live), a new tensor; the unscaled live Gram is released."""
        Gh = self.gram / self.d[:, None]
        Gh.div_(self.d[None, :])
        self.G_hat, self.gram = Gh, None
        return Gh

    def rescale_obs(self, mu: float = 0.01) -> torch.Tensor:
        """Change the scaling from unit diagonal to the OBS metric, on the unit-diagonal Ĝ (call after
        form_scaled_gram, before damp): e_j = 1/sqrt([(Ĝ + μI)⁻¹]_jj), scaled so that the new Ĝ has mean
        diagonal 1, then d ← d·e, Ĝ ← E⁻¹ Ĝ E⁻¹, V ← E V. Returns e (n_live,).

        Why: ADMM's projection keeps the largest |W + U| in the scaled space, so the scaling is the metric
        in which "closest sparse point" is measured. Under the unit-diagonal scaling the cost of dropping
        input j is taken as z_j² G_jj, its cost when nothing else may move; 1/[G⁻¹]_jj is its cost when
        every other input of the row may compensate (Optimal Brain Surgeon), which is what the W-update
        then does. Measured on SmolLM2-135M's real layers (blocks 0, 1, 8, 15, 22, 29, 32 × 256 tokens),
        with the growing-ρ schedule of preset "accurate": 2.0-2.5 % lower median error than the unit-
        diagonal metric at 50 %, 70 % and 2:4; e^0.5 and e^1.5 were worse than e, and μ = 0.1 or 0.001
        (relative to the unit diagonal) worse than 0.01. The normalisation keeps ρ and percdamp on the
        seed's scale (unnormalised, the diagonal 1/e_j² averaged 3-27 on those layers)."""
        A = self.G_hat.clone()
        A.diagonal().add_(mu)
        with one_thread(A.device):
            L, info = torch.linalg.cholesky_ex(A)
        if int(info) != 0:
            raise ValueError(f"gram: the scaled Gram + {mu:g}*I is not positive definite (Cholesky failed at "
                             f"column {int(info)}); use scaling='jacobi'")
        del A
        with one_thread(L.device):
            e = torch.cholesky_inverse(L).diagonal().rsqrt()
        del L
        e = e * e.pow(-2).mean().sqrt()  # mean(1 / e²) = 1: Ĝ's new mean diagonal
        self.d = self.d * e
        self.G_hat.div_(e[:, None]).div_(e[None, :])
        self.V = self.V * e[:, None]
        return e

    def damp(self, lam: float) -> torch.Tensor:
        """Ĝ ← Ĝ + λI in place, then B = Ĝ V; returns B."""
        self.G_hat.diagonal().add_(lam)
        self.lam = lam
        self.B = torch.mm(self.G_hat, self.V)
        return self.B

    def denominator(self) -> float:
        """tr(W G Wᵀ) from the damped problem (no extra GEMM): Vᵀ B − λ ||V||²."""
        V = self.V
        return float(torch.sum(V * self.B, dtype=torch.float64)) - self.lam * float(
            torch.sum(V * V, dtype=torch.float64))

    def take_gram(self) -> torch.Tensor:
        """Hand Ĝ's storage over to the caller (e.g. a W-update solver that factors it in place)."""
        Gh, self.G_hat = self.G_hat, None
        return Gh

    # --- between the solve's (in_live, out) layout and the weight's (out, in) layout ---------------------

    def full_scores(self, W: torch.Tensor, U: torch.Tensor | None,
                    S: torch.Tensor | None = None) -> torch.Tensor:
        """|W + U| (in_live, out) -> scores (out, in) in the weight's layout, dead columns = DEAD_SCORE
        (into S if given: its dead columns must hold DEAD_SCORE already)."""
        out_f, in_f = self.shape
        cd, dev = W.dtype, W.device
        if S is None:
            S = torch.full((out_f, in_f), masks.DEAD_SCORE, dtype=cd, device=dev) if self.n_dead else \
                torch.empty(out_f, in_f, dtype=cd, device=dev)
        if self.n_dead:
            S[:, self.live_idx] = (W if U is None else W + U).abs().T
        else:  # one strided pass straight into the (out, in) layout, then abs in place
            if U is None:
                S.copy_(W.T)
            else:
                torch.add(W.T, U.T, out=S)
            S.abs_()
        return S

    def select_mask(self, W: torch.Tensor, U: torch.Tensor | None, pattern, sparsity: float, *,
                    reference: bool = False, used: dict | None = None,
                    buf: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None,
                                                              torch.Tensor]:
        """The pattern's mask of the scores |W + U| (W, U: (in_live, out); U may be None) at `sparsity`.

        Returns (M: bool (in_live, out), Mfull: bool (out, in) or None, the score buffer for the next call).
        Unstructured masks without dead inputs are selected in the solve's (in, out) layout (Mfull None): a
        per-layer top-k does not care about layout, and this saves two transposed copies per update (~8 and
        ~3 ms each at 1024x1024 against a 20-60 ms GEMM); only exact ties in |W + U| then see another index
        order (measure-zero events). Otherwise the scores go to the weight's layout (dead columns last)."""
        if pattern.kind == "unstructured" and not self.n_dead:
            S = buf if buf is not None else torch.empty_like(W)
            S = torch.abs(W, out=S) if U is None else torch.add(W, U, out=S).abs_()
            return masks.select(S, pattern, sparsity, reference=reference, used=used), None, S
        S = self.full_scores(W, U, buf)
        Mfull = masks.select(S, pattern, sparsity, reference=reference, used=used)
        return self.live_part(Mfull), Mfull, S

    def live_part(self, Mfull: torch.Tensor) -> torch.Tensor:
        """The live columns of an (out, in) mask, in the solve layout (in_live, out)."""
        return (Mfull[:, self.live_idx] if self.n_dead else Mfull).T.contiguous()

    def to_output(self, Z: torch.Tensor, Mfull: torch.Tensor) -> torch.Tensor:
        """The scaled solution Z (in_live, out) back to a weight (out, in) in the compute dtype: Z / d
        transposed; dead columns keep their original weight where Mfull keeps them (only when the budget
        prunes fewer than all dead inputs), zero elsewhere."""
        if not self.n_dead:
            return (Z / self.d[:, None]).T
        out_f, in_f = self.shape
        out = torch.empty(out_f, in_f, dtype=Z.dtype, device=Z.device)
        out[:, self.live_idx] = (Z / self.d[:, None]).T
        dead_idx = torch.nonzero(self.dead).squeeze(1)
        out[:, dead_idx] = self.weight[:, dead_idx].masked_fill(~Mfull[:, dead_idx], 0)
        return out


def scale(weight: torch.Tensor, G: torch.Tensor, compute_dtype: torch.dtype,
          ridge: float = 0.0) -> ScaledProblem:
    """Dead inputs out, then d = sqrt(diag(G_live + ridge·I)) + ε and V = D W_liveᵀ (step 1).

    weight (out, in) any float dtype; G (in, in) on weight's device. ridge > 0 (ALPS) is added to the live
    Gram's diagonal before the scaling, so Ĝ then has an exactly unit diagonal."""
    Gc = G.to(compute_dtype)
    dead = Gc.diagonal() <= 0
    n_dead = int(dead.sum())
    live_idx = torch.nonzero(~dead).squeeze(1) if n_dead else None
    Gl = Gc[live_idx][:, live_idx] if n_dead else Gc
    if ridge:
        Gl = Gl.clone() if Gl is G else Gl
        Gl.diagonal().add_(ridge)
    diag = Gl.diagonal()
    d = torch.sqrt(diag) + scale_eps(float(diag.mean()) if diag.numel() else 1.0)
    Wc = weight.to(compute_dtype)
    V = ((Wc[:, live_idx] if n_dead else Wc) * d).T.contiguous()  # (in_live, out)
    return ScaledProblem(weight=Wc, d=d, V=V, gram=Gl, dead=dead, live_idx=live_idx)
