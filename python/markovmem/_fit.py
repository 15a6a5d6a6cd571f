"""Sparse dictionary fit: each new token's next-token counts as f(alpha) over old rows.

fit_alpha selects a support of at most s states per target and fits alpha by
KL(q_hat || f(alpha)) under the "logit" or "mixture" link (DESIGN §1);
closed_form_alpha gives the weighted least-squares start on a given support.
The work runs in the C++ core, in parallel over targets, without the GIL.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import _core, _distributed
from ._checks import integer, real
from ._matrix import TransitionMatrix, _threads

__all__ = ["AlphaFit", "closed_form_alpha", "fit_alpha"]

_LINKS = {"logit": 0, "mixture": 1}


@dataclass(frozen=True, eq=False)
class AlphaFit:
    """Result of :func:`fit_alpha` (or :func:`closed_form_alpha`).

    Attributes
    ----------
    alpha : (m, n_states) scipy.sparse.csr_array of float64
        Row ``i`` holds alpha for target ``i``: at most ``s`` stored entries,
        column indices sorted.  The stored pattern is the support.
    kl : (m,) float64
        KL(q_hat || f(alpha)) in nats over all base states (tail included),
        q_hat the target row normalised.
    n_iter : (m,) int64
        Newton iterations summed over every refit of the row.
    converged : (m,) bool
        The final refit met ``tol`` within ``max_iter`` (False for a row with no candidate).
    n_candidates : (m,) int64
        Rows that survived screening for the target, i.e. the pool (logit: the
        longer list that its rounds rescore); the support size for a fixed-support fit.
    link : str
        "logit" or "mixture".
    n_samples : (m,) float64
        Total count of each target row (the ``N`` of the theory).
    """

    alpha: Any
    kl: np.ndarray
    n_iter: np.ndarray
    converged: np.ndarray
    n_candidates: np.ndarray
    link: str
    n_samples: np.ndarray
    _P: TransitionMatrix = field(repr=False)

    @property
    def support(self) -> list[np.ndarray]:
        """The support of each row: a list of m sorted (k_i,) int32 arrays of state ids (views into ``alpha``)."""
        ip = self.alpha.indptr
        return [self.alpha.indices[ip[i] : ip[i + 1]] for i in range(self.alpha.shape[0])]

    def __len__(self) -> int:
        return int(self.alpha.shape[0])

    def predict(self, *, n_threads: int | None = None) -> Any:
        """The fitted rows f(alpha) over the base states.

        Returns
        -------
        (m, n_base) scipy.sparse.csr_array of float32
            Row ``i`` stores f(alpha_i) on the union of its support rows' stored
            columns; the rest of its mass (``1 - row sum``) is the tail, which
            is uniform over the other base states under both links.  This is
            exactly what :meth:`TransitionMatrix.expand` takes: ``P.expand(fit)``
            calls it.
        """
        import scipy.sparse as sp

        a = self.alpha
        indptr, indices, data = _core.predict_rows(
            self._P._m,
            np.ascontiguousarray(a.indptr, dtype=np.int64),
            np.ascontiguousarray(a.indices, dtype=np.int32),
            np.ascontiguousarray(a.data, dtype=np.float64),
            _LINKS[self.link],
            _threads(n_threads),
        )
        return sp.csr_array((data, indices, indptr), shape=(a.shape[0], self._P.n_base))

    def __repr__(self) -> str:
        return (
            f"AlphaFit(m={len(self)}, link={self.link!r}, nnz={self.alpha.nnz}, "
            f"mean_kl={float(np.mean(self.kl)):.4g}, converged={int(np.sum(self.converged))}/{len(self)})"
        )


# ----------------------------------------------------------------------------- argument handling
def _targets(
    P: TransitionMatrix, targets: Any, n_samples: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(indptr int64, indices int32, data float64, totals) of the targets after the cheap checks."""
    import scipy.sparse as sp

    if sp.issparse(targets):
        csr = targets.tocsr() if targets.format != "csr" else targets
    else:
        dense = np.asarray(targets)
        if dense.ndim == 1:
            dense = dense[None, :]
        if dense.ndim != 2:
            raise ValueError(f"targets must be 2-D (m, n_base); got shape {dense.shape}")
        if not (np.issubdtype(dense.dtype, np.number) or dense.dtype == bool):
            raise TypeError(f"targets must hold numbers; got dtype {dense.dtype}")
        csr = sp.csr_array(dense)
    m, n_cols = int(csr.shape[0]), int(csr.shape[1])
    if m == 0:
        raise ValueError("targets has no rows; expected at least one target")
    if n_cols not in (P.n_base, P.n_states):
        raise ValueError(f"targets has shape {(m, n_cols)}; expected (m, n_base = {P.n_base}) columns")
    if not (np.issubdtype(csr.dtype, np.floating) or np.issubdtype(csr.dtype, np.integer) or csr.dtype == bool):
        raise TypeError(f"targets must hold real numbers; got dtype {csr.dtype}")
    if not csr.has_canonical_format:
        csr = csr.copy()
        csr.sum_duplicates()
    csr.sort_indices()
    indptr = np.ascontiguousarray(csr.indptr, dtype=np.int64)
    indices = np.ascontiguousarray(csr.indices, dtype=np.int32)
    data = np.ascontiguousarray(csr.data, dtype=np.float64)
    nz = data > 0  # False for NaN, negatives and zeros: one pass clears the usual all-positive input
    if not nz.all():
        _check_finite(data, indices, indptr)
        if data.min() < 0:
            k = int(np.argmin(data))
            r = _row_of(indptr, k)
            raise ValueError(f"targets row {r} holds a negative count ({data[k]}) at state {int(indices[k])}")
        # explicit zeros carry no information; drop them so they are not "observed"
        keep_rows = np.repeat(np.arange(m), np.diff(indptr))[nz]
        indices, data = np.ascontiguousarray(indices[nz]), np.ascontiguousarray(data[nz])
        indptr = np.zeros(m + 1, np.int64)
        np.cumsum(np.bincount(keep_rows, minlength=m), out=indptr[1:])
    if indices.size and int(indices.max()) >= P.n_base:
        k = int(np.argmax(indices >= P.n_base))
        r = _row_of(indptr, k)
        raise IndexError(
            f"targets row {r} has a count on state {int(indices[k])}, outside the base states [0, n_base = {P.n_base})"
        )
    empty = np.diff(indptr) == 0
    if empty.any():
        r = int(np.flatnonzero(empty)[0])
        raise ValueError(f"targets row {r} has no counts; every target needs at least one observed next token")
    # Every row has an entry, so reduceat sums exactly each row's range (10x faster than bincount of a repeat).
    totals = np.add.reduceat(data, indptr[:-1])
    if not np.all(np.isfinite(totals)):  # an infinite count (NaN and negatives were refused above)
        _check_finite(data, indices, indptr)
    if n_samples is not None:
        ns = np.broadcast_to(np.asarray(n_samples, dtype=np.float64), (m,))
        if not np.all(np.isfinite(ns)) or np.any(ns <= 0):
            raise ValueError(f"n_samples must be positive and finite; got {n_samples!r}")
        off = np.abs(totals - 1.0) > 1e-4
        if off.any():
            r = int(np.flatnonzero(off)[0])
            raise ValueError(
                f"with n_samples, targets rows must be probabilities summing to 1; row {r} sums to {totals[r]:.6g}"
            )
        data = np.ascontiguousarray(data * np.repeat(ns, np.diff(indptr)))
        totals = ns.astype(np.float64).copy()
    return indptr, indices, data, totals


def _row_of(indptr: np.ndarray, k: int) -> int:
    """The row of a CSR whose range holds entry k (for naming the row at fault)."""
    return int(np.searchsorted(indptr, k, side="right") - 1)


def _check_finite(data: np.ndarray, indices: np.ndarray, indptr: np.ndarray) -> None:
    """ValueError naming the row and state of the first non-finite count, if any."""
    bad = ~np.isfinite(data)
    if bad.any():
        k = int(np.argmax(bad))
        r = _row_of(indptr, k)
        raise ValueError(f"targets row {r} holds a non-finite value ({data[k]}) at state {int(indices[k])}")


def _support(P: TransitionMatrix, support: Any, m: int) -> tuple[np.ndarray, np.ndarray]:
    """(indptr int64, indices int32) of per-row supports from an AlphaFit, a sparse (m, n_states)
    matrix (its stored pattern), a 2-D int array (m, k) or a sequence of m 1-D int arrays."""
    import scipy.sparse as sp

    if isinstance(support, AlphaFit):
        support = support.alpha
    if sp.issparse(support):
        csr = support.tocsr()
        if csr.shape != (m, P.n_states):
            raise ValueError(f"support has shape {csr.shape}; expected (m, n_states) = {(m, P.n_states)}")
        csr = csr.copy()
        csr.sort_indices()
        return np.ascontiguousarray(csr.indptr, np.int64), np.ascontiguousarray(csr.indices, np.int32)
    if isinstance(support, np.ndarray) and support.ndim == 2:
        if support.shape[0] != m:
            raise ValueError(f"support has {support.shape[0]} rows; expected {m} (one per target)")
        arrs = [support[0]]  # one dtype for every row: row 0 names it in an error
        flat = support.reshape(-1)
        lens = np.full(m, support.shape[1], np.int64)
    else:
        if isinstance(support, np.ndarray) and support.ndim == 1 and m == 1 and support.dtype != object:
            rows: Sequence[Any] = [support]
        else:
            rows = list(support)
        if len(rows) != m:
            raise ValueError(f"support has {len(rows)} rows; expected {m} (one per target)")
        arrs = [np.asarray(r) for r in rows]
        for i, a in enumerate(arrs):
            if a.ndim != 1:
                raise ValueError(f"support[{i}] must be 1-D; got shape {a.shape}")
        lens = np.fromiter((a.size for a in arrs), np.int64, m)
        flat = np.concatenate(arrs) if m else np.zeros(0, np.int64)
    if flat.size and not np.issubdtype(flat.dtype, np.integer):
        # name the first row at fault (a float row makes the concatenation float)
        i = next((i for i, a in enumerate(arrs) if a.size and not np.issubdtype(a.dtype, np.integer)), 0)
        raise TypeError(f"support[{i}] must hold integer state ids; got dtype {arrs[i].dtype}")
    indptr = np.zeros(m + 1, np.int64)
    np.cumsum(lens, out=indptr[1:])
    flat = flat.astype(np.int64, copy=False)
    if flat.size:
        bad = (flat < 0) | (flat >= P.n_states)
        if bad.any():
            i = _row_of(indptr, int(np.argmax(bad)))
            raise IndexError(f"support[{i}] holds a state outside [0, n_states = {P.n_states})")
        # sort within rows with one sort over (row, state) keys
        row_of = np.repeat(np.arange(m, dtype=np.int64), lens)
        flat = np.sort(row_of * P.n_states + flat) - row_of * P.n_states
    return indptr, np.ascontiguousarray(flat, np.int32)


def _link(link: str) -> int:
    if link not in _LINKS:
        raise ValueError(f"link is {link!r}; expected 'logit' or 'mixture'")
    return _LINKS[link]


def _make_fit(P: TransitionMatrix, res: tuple, link: str, totals: np.ndarray) -> AlphaFit:
    import scipy.sparse as sp

    indptr, indices, alpha, kl, n_iter, converged, n_cand = res
    m = len(kl)
    A = sp.csr_array((alpha, indices, indptr), shape=(m, P.n_states))
    return AlphaFit(A, kl, n_iter, converged.astype(bool), n_cand, link, np.asarray(totals, np.float64), P)


def _check_matrix(P: Any) -> None:
    if not isinstance(P, TransitionMatrix):
        raise TypeError(f"P must be a markovmem.TransitionMatrix; got {type(P).__name__}")


# Rows from which a fit runs in a worker thread with a bar (about a second of work at the
# speeds of bench/results/fit_bench.md).  Below that the fit runs in the calling thread: a
# worker thread costs milliseconds (its OpenMP team is created anew), as much as a short fit.
_WORKER_ROWS = {"fixed": 20_000, "mixture": 100, "logit": 1}


def _run_rows(call: Callable[[Any], Any], m: int, progress: bool, desc: str, min_rows: int) -> Any:
    """``call(control)`` for a fit of ``m`` rows.  With ``progress`` and at least ``min_rows``
    rows the fit runs in a worker thread while this one shows a tqdm bar of the rows done (it
    appears once the fit has taken 2 s) and stays interruptible: Ctrl-C cancels the rows not
    yet started and raises KeyboardInterrupt once the running ones finish.  Otherwise the
    call runs in this thread."""
    if not progress or m < min_rows:
        return call(None)
    from tqdm.auto import tqdm

    control = _core.FitControl()
    box: dict[str, Any] = {}
    finished = threading.Event()

    def work() -> None:
        try:
            box["result"] = call(control)
        except BaseException as exc:  # noqa: BLE001 - every exception, KeyboardInterrupt too, is re-raised in the caller's thread below
            box["error"] = exc
        finally:
            finished.set()

    # Waiting is on an Event, not Thread.join: with CPython 3.11 a join interrupted by
    # Ctrl-C left the worker still running after the next join returned (seen in
    # tests/test_fit.py; the interrupted-join handling of bpo-45274 is the likely cause).
    worker = threading.Thread(target=work, name="markovmem-fit", daemon=True)
    bar = tqdm(total=m, desc=desc, unit="target", delay=2.0, mininterval=0.5, dynamic_ncols=True, leave=False)
    try:
        worker.start()
        while not finished.wait(0.2):
            done = control.done
            if done > bar.n:  # redraw on progress only (a log file gets one line per redraw)
                bar.update(done - bar.n)
    except KeyboardInterrupt:
        control.cancel()
        finished.wait()
        worker.join()
        raise
    finally:
        bar.close()
    worker.join()
    if "error" in box:
        raise box["error"]
    return box["result"]


# ----------------------------------------------------------------------------- public API
def fit_alpha(
    P: TransitionMatrix,
    targets: Any,
    s: int = 16,
    link: str = "logit",
    bound: float = 10.0,
    candidates: Any = None,
    max_iter: int = 100,
    tol: float = 1e-10,
    n_threads: int | None = None,
    seed: int = 0,
    n_samples: Any = None,
    *,
    support: Any = None,
    oversize: float | None = None,
    swap_passes: int = 1,
    cv_bound: bool = True,
    progress: bool = True,
    dist: bool | None = None,
    group: Any = None,
) -> AlphaFit:
    """Fit each target as a sparse combination of P's rows, minimising KL(q_hat || f(alpha)).

    For target row ``c`` (counts over the base states, ``q_hat = c / sum(c)``)
    find ``alpha`` with at most ``s`` nonzeros minimising KL(q_hat || f(alpha))
    over all base states, tail included (DESIGN §1):

    - ``link="logit"``: ``f = softmax(sum_v alpha_v log p(.|v))`` with
      ``||alpha||_2 <= bound``.  Each row's constant tail log cancels inside the
      softmax, so the logits are sparse deviations and no dense vector is built.
    - ``link="mixture"``: ``f = sum_v alpha_v p(.|v)`` with alpha on the simplex.

    ``p(.|v)`` is the stored row of P.  After an open expansion
    (:meth:`TransitionMatrix.expand` with ``incoming``) that is the distribution
    of row ``v`` given an old next state, not scaled by ``1 - leak[v]``: the fit
    describes the new token over the base states, as a new row must.

    Algorithm, per target (in parallel over targets, deterministic for a seed
    whatever the thread count):

    1. *Screening by column access.*  An inverted index (CSC) of P is built on
       the first call and kept with P (see :meth:`TransitionMatrix.clear_cache`;
       a ``candidates`` array builds a restricted one per call instead).  The
       product of q_hat with it touches only the rows that store some observed
       token; each touched row is scored by minus the gradient of
       the objective at a background model (mixture: the uniform blend of all
       rows, with the columns stored by more than 1/8 of the rows left out of
       this product for speed; logit: ``softmax(c * mean log-row)`` with the
       scale ``c`` fitted to q_hat, the scale-aware start).  The best
       ``candidates`` rows form the pool (logit keeps a 32x longer list).
    2. *Greedy forward selection by gain* over the pool: every candidate's gain
       is estimated to second order in its own coefficient, the best four are
       line-searched exactly, the best is added and the support is refitted by
       Newton.  The logit link grows the support to ``oversize * s`` (default
       2 s) and prunes back to ``s`` by the smallest quadratic-model loss.
    3. *Swap pass*: each support state in turn (seeded order) is removed, the
       best replacement found by gain, and the swap kept if the refitted
       objective decreases.
    4. *Logit rounds*: the longer list is rescored by the second-order gain at
       the current fit, the best ``candidates`` become the new pool, and steps
       2-3 repeat from the current support (at most 3 rounds, stopping when the
       support no longer changes).  This is what lets the true rows in when
       near-collinear rows were picked first.  Steps 2-4 run twice for the
       logit link, once from the screen above and once from the screen against
       the uniform background (the gradient at ``alpha = 0``); the support
       with the lower objective is kept.
    5. *Final refit*: Newton with the ball constraint solved exactly through its
       Lagrange multiplier (logit), projected Newton on ``alpha >= 0`` whose
       minimiser lies on the simplex (mixture), to ``tol``.
    6. *Logit radius by cross-validation* (``cv_bound=True``): the counts are
       split into two folds by thinning (each observed sample goes to either
       fold by a seeded fair coin); steps 1-5 are run on each fold within the
       radii ``bound``, ``rho / 2`` and ``rho / 4`` (``rho`` the norm of the
       fit of step 5) and scored by the log-likelihood of the other fold.  A
       smaller radius is taken only when its held-out gain over ``bound``
       exceeds three standard errors (half-size folds favour small radii);
       the target is then refitted on all counts within it, so the returned
       alpha minimises KL(q_hat || f(alpha)) with ``||alpha||_2 <= r`` for the
       chosen ``r <= bound``.  Why: with many candidate rows and few samples
       the search finds rows that explain single observations of rare tokens
       with a large coefficient, which lowers the objective on the counts but
       raises the KL to the true distribution; held-out counts do not reward
       that (bench/results/logit_vs_greedy.md).  It costs three to five times
       the fit without it (T = 131,072, s = 4 and 16).  Probabilities given
       without ``n_samples`` split into two equal folds, so the comparison is
       then in-sample and keeps ``bound`` unless a smaller radius also fits
       the counts better.

    Parameters
    ----------
    P : TransitionMatrix
        The dictionary: every state's row (a distribution over base states) is an atom.
    targets : (m, n_base) sparse matrix or array-like of counts
        Row ``i``: next-token counts of new token ``i`` over the base states
        (float or int; explicit zeros are ignored).  With ``n_samples``, rows
        are probabilities instead.
    s : int
        Maximum support size per row (>= 1).
    link : {"logit", "mixture"}
    bound : float
        Logit link: radius of the L2 ball on alpha (> 0).  Ignored by mixture.
    candidates : int or 1-D array of int, optional
        An int sets the screened pool size per target (default ``max(256, 16 s)``);
        an array restricts the atoms to these state ids.
    max_iter, tol : int, float
        Final Newton refit: at most ``max_iter`` iterations, stop when the Newton
        decrement is below ``tol * max(1, objective)``.
    n_threads : int, optional
        OpenMP threads (None: the OpenMP default).
    seed : int
        Sets the order in which the swap pass (step 3) visits the support
        states of each row and the folds of step 6 (splitmix64 streams seeded
        by ``seed`` and the row index).  Nothing else is random.  Results are
        the same for every ``n_threads``.
    n_samples : float or (m,) array, optional
        When given, ``targets`` rows are probabilities and this is their sample
        count N (recorded as ``AlphaFit.n_samples``; the fit itself is the same).
    support : optional
        Skip selection and fit on this fixed support per row (an AlphaFit, a
        sparse (m, n_states) pattern, or m arrays of state ids).  The logit link
        starts from :func:`closed_form_alpha`; the mixture link from the uniform
        blend refined by three EM steps (the log-space closed form clipped to the
        simplex zeroes atoms that projected Newton then revives only slowly).
    oversize : float, optional
        Forward selection grows to ``ceil(oversize * s)`` before pruning
        (default 2 for logit, 1 for mixture).
    swap_passes : int
        Number of swap passes (0 disables them).
    cv_bound : bool
        Logit link: choose the radius of the ball on alpha by cross-validation
        (step 6 above).  False fits within ``bound`` only.
    progress : bool
        For a long fit (any logit selection, a mixture selection of 100 targets
        or more, a fixed-support fit of 20,000 or more), show a tqdm bar of the
        targets done once the fit has run for 2 s, and let Ctrl-C stop it: the
        targets not yet started are skipped and KeyboardInterrupt is raised (a
        logit fit at s = 64 takes seconds per target).  Shorter fits, and all
        fits with False, run in the calling thread with no bar.  In a
        distributed run only rank 0 shows it (the rows of its own block).
    dist : bool, optional
        Spread the targets over the ranks of a torch.distributed process group
        (e.g. under ``torchrun``).  None (default): when the default group is
        initialised; True: also initialise it from torchrun's environment when
        it is not; False: this process alone.  Every rank passes the same
        arguments and maps the same matrix file (``TransitionMatrix.load(path,
        mmap=True)`` shares the pages between the ranks of a node); each fits a
        contiguous block of targets, and every rank returns the whole AlphaFit,
        equal row for row to a one-process fit (target ``i`` draws from the
        random streams of row ``i`` whatever the block it falls in).  See
        docs/howto/distributed.md.
    group : torch.distributed.ProcessGroup, optional
        The group to spread over (default: the default group).

    Returns
    -------
    AlphaFit

    Raises
    ------
    ValueError
        A target row with no counts or a NaN / negative count; ``s <= 0``;
        ``bound <= 0``; an unknown link.
    IndexError
        A count on a state ``>= n_base``; a support or candidate id out of range.
    markovmem.DistributedError
        In a distributed run, instead of the above on every rank: some rank
        failed (the message names it and gives its error) or lost contact with
        the others within the process group's timeout.

    Warns
    -----
    UserWarning
        Some rows had fewer than ``s`` candidate states (no row stored enough
        of their observed tokens); they are fitted on what exists, and
        ``AlphaFit.n_candidates`` says how many per row.

    Examples
    --------
    >>> fit = mm.fit_alpha(P, counts, s=8, link="mixture")      # doctest: +SKIP
    >>> Q, cert = P.expand(fit)                                 # doctest: +SKIP
    """
    ranks = _distributed.resolve(dist, group)
    if ranks is not None:
        progress = progress and ranks.rank == 0
    parts = _distributed.exchange(
        ranks,
        lambda: _fit_block(
            P,
            targets,
            s,
            link,
            bound,
            candidates,
            max_iter,
            tol,
            n_threads,
            seed,
            n_samples,
            support,
            oversize,
            swap_passes,
            cv_bound,
            progress,
            ranks,
        ),
    )
    fit = _make_fit(P, _concat_rows([res for res, _ in parts]), link, parts[0][1])
    short = fit.n_candidates < s if support is None else np.zeros(len(fit), bool)
    if short.any():
        rows = np.flatnonzero(short)
        warnings.warn(
            f"{len(rows)} of {len(fit)} targets had fewer than s = {s} candidate states (first: row {int(rows[0])} "
            f"with {int(fit.n_candidates[rows[0]])}); they were fitted on what exists, see AlphaFit.n_candidates",
            UserWarning,
            stacklevel=2,
        )
    return fit


def _fit_block(
    P: TransitionMatrix,
    targets: Any,
    s: Any,
    link: str,
    bound: Any,
    candidates: Any,
    max_iter: Any,
    tol: Any,
    n_threads: Any,
    seed: Any,
    n_samples: Any,
    support: Any,
    oversize: Any,
    swap_passes: Any,
    cv_bound: bool,
    progress: bool,
    ranks: _distributed.Ranks | None,
) -> tuple[tuple, np.ndarray]:
    """Checks every argument, then fits this rank's contiguous block of targets (all of them in
    one process).  Returns (the core's result tuple for the block, every target's total count)."""
    _check_matrix(P)
    lk = _link(link)
    s = integer(s, "s", low=1)
    bound = real(bound, "bound")
    if not bound > 0:
        raise ValueError(f"bound is {bound}; expected > 0")
    max_iter = integer(max_iter, "max_iter", low=1)
    tol = real(tol, "tol")
    if not tol >= 0:
        raise ValueError(f"tol is {tol}; expected >= 0")
    seed = integer(seed, "seed")
    indptr, indices, data, totals = _targets(P, targets, n_samples)
    m = len(indptr) - 1
    a, b = (0, m) if ranks is None else _distributed.block(m, ranks.rank, ranks.world)
    # The block's targets as CSR parts of their own (views; indptr rebased to 0).
    ip = np.ascontiguousarray(indptr[a : b + 1] - indptr[a])
    ix, dt = indices[indptr[a] : indptr[b]], data[indptr[a] : indptr[b]]
    if support is not None:
        sp_ip, sp_ix = _support(P, support, m)
        sp_ip, sp_ix = np.ascontiguousarray(sp_ip[a : b + 1] - sp_ip[a]), sp_ix[sp_ip[a] : sp_ip[b]]
        res = _run_rows(
            lambda control: _core.fit_on_support(
                P._m, ip, ix, dt, sp_ip, sp_ix, None, lk, bound, max_iter, tol, _threads(n_threads), control
            ),
            b - a,
            progress,
            f"fit_alpha ({link}, fixed support)",
            _WORKER_ROWS["fixed"],
        )
        return res, totals
    n_cand = 0
    allowed = np.zeros(0, np.int32)
    if candidates is not None:
        if isinstance(candidates, (int, np.integer)) and not isinstance(candidates, bool):
            if candidates < 1:
                raise ValueError(f"candidates is {candidates}; expected a pool size >= 1 or an array of state ids")
            n_cand = int(candidates)
        else:
            ids = np.asarray(candidates)
            if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
                raise TypeError("candidates must be an int (pool size) or a 1-D array of integer state ids")
            if ids.size == 0:
                raise ValueError("candidates is empty; expected at least one state id")
            if ids.min() < 0 or ids.max() >= P.n_states:
                raise IndexError(f"candidates holds a state outside [0, n_states = {P.n_states})")
            allowed = np.ascontiguousarray(np.unique(ids), dtype=np.int32)
    if oversize is not None:
        oversize = real(oversize, "oversize")
        if not oversize >= 1:
            raise ValueError(f"oversize is {oversize}; expected >= 1")
    swap_passes = integer(swap_passes, "swap_passes", low=0)
    # row_offset = a: row a + i of the whole draws from the same random streams on every world size.
    res = _run_rows(
        lambda control: _core.fit_alpha(
            P._m,
            ip,
            ix,
            dt,
            lk,
            s,
            bound,
            n_cand,
            0.0 if oversize is None else oversize,
            swap_passes,
            max_iter,
            tol,
            _threads(n_threads),
            seed & (2**64 - 1),
            allowed,
            bool(cv_bound),
            a,
            control,
        ),
        b - a,
        progress,
        f"fit_alpha ({link}, s = {s})",
        _WORKER_ROWS[link],
    )
    return res, totals


def _concat_rows(parts: list[tuple]) -> tuple:
    """The core's result tuples (indptr, indices, alpha, kl, n_iter, converged, n_candidates) of
    consecutive row blocks joined into the tuple of all rows."""
    if len(parts) == 1:
        return parts[0]
    ends = np.cumsum([0] + [int(p[0][-1]) for p in parts[:-1]])
    indptr = np.concatenate([parts[0][0][:1]] + [p[0][1:] + e for p, e in zip(parts, ends, strict=False)])
    return (indptr,) + tuple(np.concatenate([p[i] for p in parts]) for i in range(1, 7))


def closed_form_alpha(
    P: TransitionMatrix, targets: Any, support: Any, *, n_threads: int | None = None, n_samples: Any = None
) -> AlphaFit:
    """Closed-form alpha on a given support: weighted least squares in centred log space.

    For each target minimises, over alpha and a constant c,
    ``sum_x q_hat(x) (log q_hat(x) - c - sum_{v in S} alpha_v log p(x|v))**2``
    over the observed tokens x (normal equations, |S| x |S| Cholesky with a
    1e-10 relative ridge).  The constant absorbs each row's tail log, so only
    the rows' sparse deviations enter.  It is the start of the KL solver on a
    fixed support and the initial embedding ``E^T alpha`` for embedding tuning.

    Parameters
    ----------
    P : TransitionMatrix
    targets : (m, n_base) sparse or array-like of counts
        As for :func:`fit_alpha`.
    support : AlphaFit, (m, n_states) sparse pattern, (m, k) int array or m 1-D int arrays
        The states of each row.

    Returns
    -------
    AlphaFit
        ``link="logit"``; ``kl`` is the logit-link KL at the returned alpha
        (no ball constraint); ``n_iter`` is 0.
    """
    _check_matrix(P)
    indptr, indices, data, totals = _targets(P, targets, n_samples)
    m = len(indptr) - 1
    sp_ip, sp_ix = _support(P, support, m)
    res = _core.closed_form_alpha(P._m, indptr, indices, data, sp_ip, sp_ix, _threads(n_threads))
    return _make_fit(P, res, "logit", totals)


def objective(
    P: TransitionMatrix, targets: Any, alpha: Any, link: str = "logit", *, n_threads: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """KL(q_hat || f(alpha)) per row and its gradient per stored entry of ``alpha`` (private; for tests).

    ``alpha`` is an (m, n_states) sparse matrix; the gradient is aligned with its
    canonical (sorted) CSR entries."""
    import scipy.sparse as sp

    indptr, indices, data, _ = _targets(P, targets, None)
    A = sp.csr_array(alpha).copy()
    A.sort_indices()
    return _core.fit_objective(
        P._m,
        indptr,
        indices,
        data,
        np.ascontiguousarray(A.indptr, np.int64),
        np.ascontiguousarray(A.indices, np.int32),
        np.ascontiguousarray(A.data, np.float64),
        _link(link),
        _threads(n_threads),
    )
