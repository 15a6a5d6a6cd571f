# Stubs of the private compiled module markovmem._core (bindings/*.cpp).
# Changes in the same commit as the binding it describes.
from typing import Any

import numpy as np
import numpy.typing as npt

__version__: str
has_openmp: bool

class InvariantError(ValueError):
    row: int | None

class FitCancelled(RuntimeError): ...

class FitControl:
    """Progress and cancellation of a running fit, shared with another Python thread."""
    def __init__(self) -> None: ...
    @property
    def done(self) -> int: ...
    def cancel(self) -> None: ...

class TransitionMatrix:
    @staticmethod
    def copy_csr(
        n_states: int,
        n_base: int,
        indptr: npt.NDArray[np.int64],
        indices: npt.NDArray[np.int32],
        data: npt.NDArray[np.float32],
        tol: float,
        n_threads: int,
        tail: npt.NDArray[np.float64] | None = None,
    ) -> TransitionMatrix: ...
    @staticmethod
    def from_topk(
        n_states: int,
        n_base: int,
        indices: npt.NDArray[np.int64] | npt.NDArray[np.int32],
        probs: npt.NDArray[np.float32],
        tol: float,
        n_threads: int,
    ) -> TransitionMatrix: ...
    @staticmethod
    def count_transitions(
        tokens: npt.NDArray[np.int32],
        offsets: npt.NDArray[np.int64],
        n_states: int,
        top_k: int,
        smoothing: float,
        n_threads: int,
    ) -> TransitionMatrix: ...
    @property
    def n_states(self) -> int: ...
    @property
    def n_base(self) -> int: ...
    @property
    def nnz(self) -> int: ...
    @property
    def storage_bytes(self) -> int: ...
    @property
    def indptr(self) -> npt.NDArray[np.int64]: ...
    @property
    def indices(self) -> npt.NDArray[np.int32]: ...
    @property
    def data(self) -> npt.NDArray[np.float32]: ...
    @property
    def tail(self) -> npt.NDArray[np.float64]: ...
    def prob(self, v: int, x: int) -> float: ...
    def log_prob(self, v: int, x: int) -> float: ...
    def prob_many(
        self, v: npt.NDArray[np.int64], x: npt.NDArray[np.int64], log: bool, n_threads: int
    ) -> npt.NDArray[np.float64]: ...
    def step(self, distribution: npt.NDArray[np.float64], n_threads: int) -> npt.NDArray[np.float64]: ...
    def stationary(
        self, tol: float, max_iter: int, n_threads: int
    ) -> tuple[npt.NDArray[np.float64], int, float, bool]: ...
    def log_likelihood(
        self, tokens: npt.NDArray[np.int32], offsets: npt.NDArray[np.int64], n_threads: int
    ) -> npt.NDArray[np.float64]: ...
    def sample(self, start: int, length: int, seed: int) -> npt.NDArray[np.int32]: ...
    def fingerprint(self, n_rows: int = -1) -> str: ...
    def clear_derived(self) -> None: ...
    def derived_keys(self) -> list[str]: ...
    def find_violation(self, tol: float, n_threads: int) -> tuple[int, str] | None: ...
    @property
    def open_blocks(
        self,
    ) -> list[
        tuple[
            int,
            int,
            npt.NDArray[np.int64],
            npt.NDArray[np.int32],
            npt.NDArray[np.float32],
            npt.NDArray[np.float64],
        ]
    ]: ...
    def with_open_blocks(self, blocks: list[tuple[Any, ...]], tol: float) -> TransitionMatrix: ...
    def total_leak(self) -> npt.NDArray[np.float64]: ...

def expand(
    P: TransitionMatrix,
    indptr: npt.NDArray[np.int64],
    indices: npt.NDArray[np.int32],
    data: npt.NDArray[np.float32],
    tol: float,
    n_threads: int,
    incoming_indptr: npt.NDArray[np.int64] | None = None,
    incoming_indices: npt.NDArray[np.int32] | None = None,
    incoming_data: npt.NDArray[np.float32] | None = None,
    max_leak: float = ...,
) -> tuple[TransitionMatrix, dict[str, Any]]: ...
def verify_expansion(
    before: TransitionMatrix, after: TransitionMatrix, tol: float, n_threads: int, max_leak: float = ...
) -> dict[str, Any]: ...
def save(P: TransitionMatrix, path: str | bytes, metadata: list[tuple[str, str]]) -> None: ...
def load(
    path: str | bytes, mmap: bool, verify: bool, n_threads: int
) -> tuple[TransitionMatrix, list[tuple[str, str]], bool]: ...
def max_threads() -> int: ...
def read_metadata(path: str) -> list[tuple[str, str]]: ...
def softmax_topk(
    logits: npt.NDArray[np.float32], k: int, n_threads: int
) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.float32]]: ...

# bindings/bind_fit.cpp: CSR parts in (targets int64/int32/float64, supports, alpha), tuples of arrays out.
def fit_alpha(
    P: TransitionMatrix,
    indptr: npt.NDArray[np.int64],
    indices: npt.NDArray[np.int32],
    data: npt.NDArray[np.float64],
    link: int,
    s: int,
    bound: float,
    n_candidates: int,
    oversize: float,
    swap_passes: int,
    max_iter: int,
    tol: float,
    n_threads: int,
    seed: int,
    allowed: npt.NDArray[Any],
    cv_bound: bool,
    row_offset: int,
    control: FitControl | None = None,
) -> tuple[Any, ...]: ...
def fit_on_support(
    P: TransitionMatrix,
    indptr: npt.NDArray[np.int64],
    indices: npt.NDArray[np.int32],
    data: npt.NDArray[np.float64],
    support_indptr: npt.NDArray[np.int64],
    support_indices: npt.NDArray[np.int32],
    support_values: Any,
    link: int,
    bound: float,
    max_iter: int,
    tol: float,
    n_threads: int,
    control: FitControl | None = None,
) -> tuple[Any, ...]: ...
def closed_form_alpha(
    P: TransitionMatrix,
    indptr: npt.NDArray[np.int64],
    indices: npt.NDArray[np.int32],
    data: npt.NDArray[np.float64],
    support_indptr: npt.NDArray[np.int64],
    support_indices: npt.NDArray[np.int32],
    n_threads: int,
) -> tuple[Any, ...]: ...
def fit_objective(
    P: TransitionMatrix,
    indptr: npt.NDArray[np.int64],
    indices: npt.NDArray[np.int32],
    data: npt.NDArray[np.float64],
    alpha_indptr: npt.NDArray[np.int64],
    alpha_indices: npt.NDArray[np.int32],
    alpha_values: npt.NDArray[np.float64],
    link: int,
    n_threads: int,
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]: ...
def predict_rows(
    P: TransitionMatrix,
    alpha_indptr: npt.NDArray[np.int64],
    alpha_indices: npt.NDArray[np.int32],
    alpha_values: npt.NDArray[np.float64],
    link: int,
    n_threads: int,
) -> tuple[Any, ...]: ...
def release_fit_workspaces() -> None: ...
def fit_workspaces_state() -> tuple[int, bool]: ...
def simd_level() -> str: ...
def set_simd_level(name: str) -> None: ...
def exp_shifted_sum(z: npt.NDArray[np.float64], shift: float) -> tuple[npt.NDArray[np.float64], float]: ...
def max_dot(z: npt.NDArray[np.float64], q: npt.NDArray[np.float64]) -> tuple[float, float]: ...
def dot_log(q: npt.NDArray[np.float64], x: npt.NDArray[np.float64], floor: float = 1e-12) -> float: ...
def mixture_terms(
    q: npt.NDArray[np.float64], f: npt.NDArray[np.float64]
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.float64], float, float, float]: ...
