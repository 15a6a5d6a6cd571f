"""Numpy/scipy reference implementations for the sparse KL fit (DESIGN §1).

Independent of markovmem's C++ core, used by the tests and the benchmarks as
the baseline: the exact objective and gradient of both links with the tail
rule, L-BFGS-B on a fixed support, a greedy gain + swap selection, the
planted-problem generator (Zipf-like rows whose top-k sets share frequent
tokens) and the KL between two rows stored as "entries + uniform tail".

A dictionary here is ``(csr, tail, n_base)``: ``csr`` a scipy CSR of the stored
entries (rows = states, columns = base states), ``tail`` the float64 tail masses.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import scipy.optimize as opt
import scipy.sparse as sp

LOG_FLOOR = 1e-12


# --------------------------------------------------------------------------- dictionary
@dataclass
class Dictionary:
    """Stored entries (CSR, float64 copy), tails and the per-row uniform tail value."""

    csr: sp.csr_array
    tail: np.ndarray
    n_base: int

    @classmethod
    def from_matrix(cls, P) -> Dictionary:
        """From a markovmem.TransitionMatrix (values widened to float64)."""
        csr = sp.csr_array(
            (np.asarray(P.data, np.float64), np.asarray(P.indices), np.asarray(P.indptr)), shape=(P.n_states, P.n_base)
        )
        return cls(csr, np.asarray(P.tail, np.float64), P.n_base)

    @property
    def k(self) -> np.ndarray:
        return np.diff(self.csr.indptr)

    @property
    def uniform(self) -> np.ndarray:
        """p(x | v) of an unstored base state x (0 for a full row)."""
        free = self.n_base - self.k
        return np.divide(self.tail, free, out=np.zeros(len(self.tail)), where=free > 0)

    @property
    def log_uniform(self) -> np.ndarray:
        return np.log(np.maximum(self.uniform, LOG_FLOOR))

    def dense_rows(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """p(x | v) for x in cols, v in rows: (len(cols), len(rows)) float64, tail included."""
        sub = self.csr[rows][:, cols].toarray().T
        stored = self.csr[rows][:, cols].copy()
        stored.data[:] = 1.0
        mask = stored.toarray().T > 0
        return np.where(mask, sub, self.uniform[rows][None, :])

    def dense_dev(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Logit deviations d_v(x) = log p(x|v) - log u_v (0 where x is unstored)."""
        sub = self.csr[rows][:, cols]
        lp = sub.copy()
        lp.data = np.log(np.maximum(lp.data, LOG_FLOOR)) - np.repeat(self.log_uniform[rows], np.diff(lp.indptr))
        # an explicit stored value equal to the uniform one gives 0 either way
        return lp.toarray().T

    def screening_data(self):
        """(CSC of the stored entries, average row pbar, mean deviation per row), computed once."""
        if getattr(self, "_screen", None) is None:
            csc = self.csr.tocsc()
            n = self.csr.shape[0]
            colsum = np.asarray(self.csr.sum(axis=0)).ravel()
            counts_u = np.bincount(
                self.csr.indices, weights=self.uniform[np.repeat(np.arange(n), self.k)], minlength=self.n_base
            )
            pbar = (colsum + self.uniform.sum() - counts_u) / n
            lp = self.csr.copy()
            lp.data = np.log(np.maximum(lp.data, LOG_FLOOR)) - np.repeat(self.log_uniform, np.diff(lp.indptr))
            mean_d = np.asarray(lp.sum(axis=1)).ravel() / self.n_base
            self._screen = (csc, pbar, mean_d)
        return self._screen

    def union(self, rows: np.ndarray) -> np.ndarray:
        """Sorted union of the stored columns of ``rows``."""
        if len(rows) == 0:
            return np.zeros(0, np.int64)
        return np.unique(self.csr[np.asarray(rows)].indices)


# --------------------------------------------------------------------------- rows with a tail
@dataclass
class TailRow:
    """A distribution over n_base states: ``vals`` on ``idx`` and ``rest`` spread uniformly over the others."""

    idx: np.ndarray
    vals: np.ndarray
    rest: float
    n_base: int

    def at(self, x: np.ndarray) -> np.ndarray:
        pos = np.searchsorted(self.idx, x)
        pos = np.minimum(pos, max(len(self.idx) - 1, 0))
        hit = (len(self.idx) > 0) & (self.idx[pos] == x) if len(self.idx) else np.zeros(len(x), bool)
        free = self.n_base - len(self.idx)
        u = self.rest / free if free > 0 else 0.0
        out = np.full(len(x), u)
        if len(self.idx):
            out[hit] = self.vals[pos[hit]]
        return out

    def dense(self) -> np.ndarray:
        return self.at(np.arange(self.n_base))


def f_row(D: Dictionary, support: np.ndarray, alpha: np.ndarray, link: str) -> TailRow:
    """f(alpha) exactly, as entries on the union of the support's stored columns plus a uniform rest."""
    support = np.asarray(support, np.int64)
    alpha = np.asarray(alpha, np.float64)
    U = D.union(support)
    T = D.n_base
    if link == "mixture":
        vals = D.dense_rows(support, U) @ alpha
        rest = float(alpha @ D.uniform[support]) * (T - len(U))
        return TailRow(U, vals, rest, T)
    z = D.dense_dev(support, U) @ alpha
    zmax = max(float(z.max()) if len(z) else 0.0, 0.0)
    e = np.exp(z - zmax)
    rest = (T - len(U)) * np.exp(-zmax)
    Z = e.sum() + rest
    return TailRow(U, e / Z, rest / Z, T)


def kl_rows(q: TailRow, f: TailRow) -> float:
    """KL(q || f) over all n_base states, tails included (the unstored states share one value each)."""
    W = np.union1d(q.idx, f.idx)
    qv, fv = q.at(W), f.at(W)
    pos = qv > 0
    kl = float(np.sum(qv[pos] * (np.log(qv[pos]) - np.log(fv[pos]))))
    n_rest = q.n_base - len(W)
    if n_rest > 0:
        cq = q.rest / (q.n_base - len(q.idx)) if q.n_base > len(q.idx) else 0.0
        cf = f.rest / (f.n_base - len(f.idx)) if f.n_base > len(f.idx) else 0.0
        if cq > 0:
            kl += n_rest * cq * (np.log(cq) - np.log(cf))
    return kl


def sample_counts(q: TailRow, N: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """N draws from q as (sorted ids, counts)."""
    probs = np.append(q.vals, q.rest)
    probs = np.maximum(probs, 0)
    c = rng.multinomial(N, probs / probs.sum())
    ids = [q.idx[c[:-1] > 0]]
    cnts = [c[:-1][c[:-1] > 0]]
    n_rest = int(c[-1])
    if n_rest:
        free = np.setdiff1d(np.arange(q.n_base), q.idx, assume_unique=True) if len(q.idx) else np.arange(q.n_base)
        draws = free[rng.integers(0, len(free), n_rest)]
        u, cu = np.unique(draws, return_counts=True)
        ids.append(u)
        cnts.append(cu)
    ids_a = np.concatenate(ids)
    cnt_a = np.concatenate(cnts)
    order = np.argsort(ids_a, kind="stable")
    ids_a, cnt_a = ids_a[order], cnt_a[order]
    uq, inv = np.unique(ids_a, return_inverse=True)
    return uq, np.bincount(inv, weights=cnt_a).astype(np.int64)


# --------------------------------------------------------------------------- planted problems
def make_dictionary(
    T: int,
    k: int,
    seed: int = 0,
    *,
    shared_frac: float = 0.5,
    popularity_a: float = 1.1,
    zipf_a: float = 1.0,
    top_mass: tuple[float, float] = (0.6, 0.95),
    n_states: int | None = None,
):
    """Zipf-like rows whose top-k sets share frequent tokens, as LM rows do.

    Each row stores k base states: ``shared_frac * k`` drawn from a global
    Zipf(``popularity_a``) popularity over token ids (so frequent ids recur in
    many rows), the rest uniformly at random; its stored probabilities are
    Zipf(``zipf_a``) over a random order of its k states, scaled to a top mass
    drawn from ``top_mass``; the rest is the row's tail.  Returns
    (indices (n, k) int32 sorted per row, probs (n, k) float32).
    """
    n = T if n_states is None else n_states
    rng = np.random.default_rng(seed)
    pop = 1.0 / np.arange(1, T + 1) ** popularity_a
    cdf = np.cumsum(pop / pop.sum())
    n_sh = round(shared_frac * k)
    idx = np.empty((n, k), np.int32)
    chunk = 4096
    for a in range(0, n, chunk):
        b = min(n, a + chunk)
        draws = np.minimum(np.searchsorted(cdf, rng.random((b - a, 4 * n_sh + 8))), T - 1)
        rnd = rng.integers(0, T, (b - a, 3 * k + 8))
        for i in range(b - a):
            sh = pd_unique(draws[i])[:n_sh]
            rest = pd_unique(np.concatenate([sh, rnd[i]]))[:k]
            if len(rest) < k:
                extra = rng.choice(np.setdiff1d(np.arange(T), rest), k - len(rest), replace=False)
                rest = np.concatenate([rest, extra])
            idx[a + i] = np.sort(rest)
    w = 1.0 / np.arange(1, k + 1) ** zipf_a
    perm = np.argsort(rng.random((n, k)), axis=1)
    probs = w[perm]
    probs /= probs.sum(axis=1, keepdims=True)
    probs *= rng.uniform(*top_mass, size=(n, 1))
    return idx, probs.astype(np.float32)


def pd_unique(a: np.ndarray) -> np.ndarray:
    """Unique values in first-seen order."""
    _, first = np.unique(a, return_index=True)
    return a[np.sort(first)]


def planted_alpha(
    n_states: int, s: int, rng: np.random.Generator, *, scale: float = 1.0, exclude: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """s distinct atoms with weights bounded away from zero: w_i in [1, 3] normalised to sum ``scale``.

    For the mixture link use scale = 1 (the simplex); for the logit link the
    same weights give a geometric mixture of the s rows (scale 1) or a sharper
    / flatter one.  The smallest weight is at least scale / (3 s)."""
    pool = np.arange(n_states) if exclude is None else np.setdiff1d(np.arange(n_states), exclude)
    S = np.sort(rng.choice(pool, s, replace=False))
    w = rng.uniform(1.0, 3.0, s)
    return S, scale * w / w.sum()


# --------------------------------------------------------------------------- objective on a support
class Problem:
    """One target q_hat (ids, probabilities) against the dictionary, restricted to a candidate pool.

    Builds dense matrices over the pool once: mixture ``A`` (|supp q|, C) of
    p(x|v); logit ``Dv`` (|U|, C) of deviations over the union U of the pool's
    stored columns (plus q's own support), so every objective is exact with the tail.
    """

    def __init__(self, D: Dictionary, q_ids: np.ndarray, q_p: np.ndarray, pool: np.ndarray, link: str):
        self.D, self.link = D, link
        self.pool = np.asarray(pool, np.int64)
        self.q_ids = np.asarray(q_ids, np.int64)
        self.q_p = np.asarray(q_p, np.float64)
        self.q_p = self.q_p / self.q_p.sum()
        nz = self.q_p > 0
        self.negH = float(np.sum(self.q_p[nz] * np.log(self.q_p[nz])))
        if link == "mixture":
            self.A = D.dense_rows(self.pool, self.q_ids)
        else:
            U = np.union1d(D.union(self.pool), self.q_ids)
            self.U = U
            self.Dv = D.dense_dev(self.pool, U)
            self.qU = np.zeros(len(U))
            self.qU[np.searchsorted(U, self.q_ids)] = self.q_p
            self.n_out = D.n_base - len(U)
            # each atom's stored columns in U (for the union of a sub-support)
            self.Dq = self.qU @ self.Dv  # E_q[d_v]

    # columns of the pool for a support given as positions into the pool
    def kl(self, S: np.ndarray, a: np.ndarray) -> float:
        return self.obj(S, a)[0]

    def obj(self, S, a, need_grad=True, need_hess=False):
        """(KL(q_hat || f), gradient, Hessian) over the support S (positions in the pool)."""
        if self.link == "mixture":
            A = self.A[:, S]
            f = A @ a
            if np.any(f <= 0):
                return np.inf, None, None
            val = self.negH - float(self.q_p @ np.log(f))
            w = self.q_p / f
            g = -A.T @ w if need_grad else None
            H = (A * (w / f)[:, None]).T @ A if need_hess else None
            return val, g, H
        Dv = self.Dv[:, S]
        z = Dv @ a
        zm = max(float(z.max()), 0.0)
        e = np.exp(z - zm)
        Z = e.sum() + self.n_out * np.exp(-zm)
        logZ = zm + np.log(Z)
        val = self.negH - float(self.qU @ z) + logZ
        fU = e / Z
        m = Dv.T @ fU
        g = m - self.Dq[S] if need_grad else None
        H = (Dv * fU[:, None]).T @ Dv - np.outer(m, m) if need_hess else None
        return val, g, H

    # ------------------------------------------------------------------ fixed-support solvers
    def newton(self, S, a0, bound=10.0, tol=1e-10, max_iter=100):
        """Newton (logit, ball ||a|| <= bound via a Lagrange multiplier) or projected Newton (mixture, simplex)."""
        S = np.asarray(S)
        if self.link == "mixture":
            return self._newton_simplex(S, a0, tol, max_iter)
        return self._newton_ball(S, a0, bound, tol, max_iter)

    def _newton_ball(self, S, a0, bound, tol, max_iter):
        a = np.array(a0, float)

        def solve(lam, a):
            for _ in range(max_iter):
                val, g, H = self.obj(S, a, need_hess=True)
                g = g + lam * a
                H = H + (lam + 1e-12) * np.eye(len(a))
                step = -np.linalg.solve(H, g)
                dec = -g @ step
                if dec < tol:
                    break
                t = 1.0
                f0 = val + 0.5 * lam * a @ a
                while t > 1e-10:
                    an = a + t * step
                    if self.obj(S, an, False)[0] + 0.5 * lam * an @ an <= f0 - 0.25 * t * dec:
                        break
                    t *= 0.5
                a = a + t * step
            return a

        a = solve(0.0, a)
        if np.linalg.norm(a) <= bound * (1 + 1e-12):
            return a
        lo, hi = 0.0, 1.0
        while np.linalg.norm(solve(hi, a)) > bound:
            lo, hi = hi, hi * 4
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            am = solve(mid, a)
            if np.linalg.norm(am) > bound:
                lo = mid
            else:
                hi, a = mid, am
            if hi - lo < 1e-12 * max(hi, 1):
                break
        return a * min(1.0, bound / np.linalg.norm(a))

    def _newton_simplex(self, S, a0, tol, max_iter):
        # minimise G(a) = -sum q log(A a) + sum a over a >= 0; its minimiser lies on the simplex.
        a = np.maximum(np.array(a0, float), 0)
        if a.sum() <= 0:
            a[:] = 1.0 / len(a)
        a = a / a.sum()
        for _ in range(max_iter):
            val, g, H = self.obj(S, a, need_hess=True)
            g = g + 1.0
            G0 = val + a.sum()
            free = ~((a <= 1e-14) & (g > 0))
            step = np.zeros_like(a)
            if free.any():
                Hf = H[np.ix_(free, free)] + 1e-14 * np.eye(free.sum())
                step[free] = -np.linalg.solve(Hf, g[free])
            step[~free] = -g[~free] * 1e-3
            dec = -(g @ step)
            if dec < tol and np.all(g[a <= 1e-14] >= -1e-9):
                break
            t = 1.0
            while t > 1e-14:
                an = np.maximum(a + t * step, 0)
                vn = self.obj(S, an, False)[0]
                if np.isfinite(vn) and vn + an.sum() <= G0 - 1e-4 * (g @ (a - an)):
                    break
                t *= 0.5
            a = an
        return a / a.sum()

    def lbfgs(self, S, a0, bound=None, tol=1e-14):
        """scipy L-BFGS-B on the fixed support (mixture: a >= 0 with the sum-free form)."""
        S = np.asarray(S)
        if self.link == "mixture":

            def fun(a):
                v, g = self.obj(S, np.maximum(a, 1e-300), True)[:2]
                return v + a.sum(), g + 1.0

            res = opt.minimize(
                fun,
                np.maximum(a0, 1e-3),
                jac=True,
                method="L-BFGS-B",
                bounds=[(0, None)] * len(S),
                options=dict(ftol=tol, gtol=1e-12, maxiter=20000, maxcor=30),
            )
            return res.x / res.x.sum(), res

        def fun_logit(a):
            return self.obj(S, a, True)[:2]

        res = opt.minimize(
            fun_logit,
            np.asarray(a0, float),
            jac=True,
            method="L-BFGS-B",
            options=dict(ftol=tol, gtol=1e-12, maxiter=20000, maxcor=30),
        )
        return res.x, res

    # ------------------------------------------------------------------ greedy selection
    def gains(self, S, a, cand):
        """Best decrease of the objective from adding each candidate alone (1-D Newton), others fixed."""
        val = self.obj(S, a, False)[0] if len(S) else np.inf
        if self.link == "mixture":
            Ac = self.A[:, cand]
            if len(S) == 0:
                with np.errstate(divide="ignore"):
                    v = self.negH - self.q_p @ np.log(Ac)
                return -v, np.ones(len(cand))
            f = self.A[:, S] @ a
            t = np.full(len(cand), 0.0)
            # maximise phi(t) = sum q log((1-t) f + t a_c), t in [0, 1]
            for _ in range(30):
                h = (1 - t)[None, :] * f[:, None] + t[None, :] * Ac
                r = (Ac - f[:, None]) / h
                d1 = self.q_p @ r
                d2 = -(self.q_p @ (r * r))
                tn = np.clip(t - d1 / np.minimum(d2, -1e-300), 0.0, 1 - 1e-9)
                if np.max(np.abs(tn - t)) < 1e-10:
                    t = tn
                    break
                t = tn
            h = (1 - t)[None, :] * f[:, None] + t[None, :] * Ac
            newv = self.negH - self.q_p @ np.log(h)
            return val - newv, t
        z = self.Dv[:, S] @ a if len(S) else np.zeros(len(self.U))
        Dc = self.Dv[:, cand]
        t = np.zeros(len(cand))
        zm = max(float(z.max()), 0.0)
        base = -(self.qU @ z)
        for _ in range(30):
            zz = z[:, None] + Dc * t[None, :]
            m = np.maximum(zz.max(axis=0), 0)
            e = np.exp(zz - m)
            Z = e.sum(axis=0) + self.n_out * np.exp(-m)
            f = e / Z
            mu = (f * Dc).sum(axis=0)
            d1 = mu - self.Dq[cand]
            d2 = (f * Dc * Dc).sum(axis=0) - mu * mu
            tn = t - d1 / np.maximum(d2, 1e-12)
            tn = np.clip(tn, t - 5, t + 5)
            if np.max(np.abs(tn - t)) < 1e-9:
                t = tn
                break
            t = tn
        zz = z[:, None] + Dc * t[None, :]
        m = np.maximum(zz.max(axis=0), 0)
        Z = np.exp(zz - m).sum(axis=0) + self.n_out * np.exp(-m)
        newv = self.negH + base - t * self.Dq[cand] + m + np.log(Z)
        if not len(S):
            val = self.negH + np.log(self.D.n_base)
        del zm
        return val - newv, t

    def select(self, s, method="gain", swap=True, bound=10.0, refit_tol=1e-9, max_swap_passes=2, deadline=None):
        """Greedy forward selection over the pool (``method`` "gain" or "grad"), refit after each
        addition, then optional swap passes.  Returns (support as state ids, alpha, KL(q_hat || f))."""
        C = len(self.pool)
        S: list[int] = []
        a = np.zeros(0)
        for _ in range(min(s, C)):
            if deadline is not None and time.perf_counter() > deadline:
                raise TimeoutError("greedy baseline passed its deadline")
            cand = np.setdiff1d(np.arange(C), S)
            if method == "gain" or not S:
                gain, t = self.gains(np.array(S, int), a, cand)
                j = int(np.argmax(gain))
            else:
                _, g, _ = self.obj_pool_grad(np.array(S, int), a)
                score = -g[cand] if self.link == "mixture" else np.abs(g[cand])
                j = int(np.argmax(score))
                t = np.zeros(len(cand))
                t[j] = 1.0 / (len(S) + 1) if self.link == "mixture" else 0.0
            c = int(cand[j])
            if self.link == "mixture":
                a = np.append(a * (1 - t[j]), t[j]) if S else np.array([1.0])
            else:
                a = np.append(a, t[j])
            S.append(c)
            a = self.newton(np.array(S), a, bound, refit_tol)
        S_arr = np.array(S, int)
        if swap and len(S_arr):
            S_arr, a = self.swap(S_arr, a, bound, refit_tol, max_swap_passes, method, deadline)
        val = self.obj(S_arr, a, False)[0]
        order = np.argsort(self.pool[S_arr])
        return self.pool[S_arr][order], a[order], val

    def obj_pool_grad(self, S, a):
        """Gradient with respect to every pool atom at the current point."""
        if self.link == "mixture":
            f = self.A[:, S] @ a
            return None, -(self.A.T @ (self.q_p / f)), None
        z = self.Dv[:, S] @ a
        zm = max(float(z.max()), 0.0)
        e = np.exp(z - zm)
        Z = e.sum() + self.n_out * np.exp(-zm)
        return None, self.Dv.T @ (e / Z) - self.Dq, None

    def swap(self, S, a, bound, tol, passes, method="gain", deadline=None):
        cur = self.obj(S, a, False)[0]
        C = len(self.pool)
        for _ in range(passes):
            improved = False
            for i in range(len(S)):
                if deadline is not None and time.perf_counter() > deadline:
                    raise TimeoutError("greedy baseline passed its deadline")
                rest = np.delete(S, i)
                ra = np.delete(a, i)
                if self.link == "mixture":
                    ra = ra / ra.sum() if ra.sum() > 0 else np.full(len(ra), 1.0 / max(len(ra), 1))
                if len(rest):
                    ra = self.newton(rest, ra, bound, tol)
                cand = np.setdiff1d(np.arange(C), rest)
                gain, t = self.gains(rest, ra, cand)
                j = int(np.argmax(gain))
                c = int(cand[j])
                if c == S[i]:
                    continue
                if self.link == "mixture":
                    na = np.append(ra * (1 - t[j]), t[j]) if len(rest) else np.array([1.0])
                else:
                    na = np.append(ra, t[j])
                NS = np.append(rest, c)
                na = self.newton(NS, na, bound, tol)
                nv = self.obj(NS, na, False)[0]
                if nv < cur - 1e-12 * max(1.0, abs(cur)):
                    S, a, cur = NS, na, nv
                    improved = True
            if not improved:
                break
        return S, a


def screen(
    D: Dictionary, q_ids: np.ndarray, q_p: np.ndarray, link: str, C: int, allowed: np.ndarray | None = None
) -> np.ndarray:
    """Candidate pool: the C states whose rows best explain q_hat, found by column access.

    mixture: score_v = sum_x q(x) p(x|v) / pbar(x), pbar the average row (the
    gradient of the mixture objective at the uniform blend of all rows); logit:
    score_v = E_q[d_v] - mean_x d_v(x) (minus the gradient at alpha = 0, the
    plain greedy start).  Only rows storing some x in supp(q) are scored above
    their tail baseline.
    """
    csc, pbar, mean_d = D.screening_data()
    cols = csc[:, q_ids]
    n = D.csr.shape[0]
    dev = cols.copy()
    if link == "mixture":
        w = q_p / pbar[q_ids]
        dev.data = dev.data - D.uniform[dev.indices]
        score = D.uniform * w.sum() + dev @ w
    else:
        dev.data = np.log(np.maximum(dev.data, LOG_FLOOR)) - D.log_uniform[dev.indices]
        score = dev @ q_p - mean_d
    if allowed is not None:
        mask = np.full(n, -np.inf)
        mask[allowed] = 0
        score = score + mask
    C = min(C, n)
    top = np.argpartition(-score, C - 1)[:C]
    return np.sort(top[np.argsort(-score[top])])


def tail_rows(rows, n_base: int) -> list[TailRow]:
    """TailRow per row of an (m, n_base) sparse matrix whose missing mass is the tail (e.g. AlphaFit.predict())."""
    csr = sp.csr_array(rows)
    out = []
    for i in range(csr.shape[0]):
        a, b = csr.indptr[i], csr.indptr[i + 1]
        vals = np.asarray(csr.data[a:b], np.float64)
        out.append(TailRow(np.asarray(csr.indices[a:b], np.int64), vals, max(0.0, 1.0 - float(vals.sum())), n_base))
    return out


def planted_targets(D: Dictionary, s: int, N: int, m: int, link: str, seed: int, scale: float = 1.0):
    """m planted problems: (supports (m, s), weights (m, s), true rows q (TailRow list), counts CSR (m, n_base))."""
    rng = np.random.default_rng(seed)
    n = D.csr.shape[0]
    Ss, Ws, qs, rows, cols, vals = [], [], [], [], [], []
    for i in range(m):
        S, w = planted_alpha(n, s, rng, scale=scale)
        q = f_row(D, S, w, link)
        ids, cnt = sample_counts(q, N, rng)
        Ss.append(S)
        Ws.append(w)
        qs.append(q)
        rows.append(np.full(len(ids), i))
        cols.append(ids)
        vals.append(cnt)
    C = sp.csr_array(
        (np.concatenate(vals).astype(np.float64), (np.concatenate(rows), np.concatenate(cols))), shape=(m, D.n_base)
    )
    return np.array(Ss), np.array(Ws), qs, C
