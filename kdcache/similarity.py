"""How alike two sets of representations are: linear CKA (Kornblith et al., 2019), cosine and distance.

No maintained CKA package fits kdcache's dependencies, so linear CKA is the
short closed form below, tested against its known properties (CKA(X, X) = 1,
invariance to orthogonal transforms and isotropic scaling) and against the
HSIC definition it simplifies (:func:`hsic`).
"""

from __future__ import annotations

import numpy as np


def _centered(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    return x - x.mean(axis=0, keepdims=True)


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA of (n, p) and (n, q) representations of the same n inputs (p and q may differ), in [0, 1].

    ``||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)`` with column-centred Xc, Yc;
    0 when either representation is constant over the inputs.
    """
    xc, yc = _centered(x), _centered(y)
    if len(xc) != len(yc):
        raise ValueError(f"CKA compares representations of the same inputs: {len(xc)} and {len(yc)} rows")
    # Through the n x n Gram matrices when they are smaller than the feature cross-products.
    if len(xc) < max(xc.shape[1], yc.shape[1]):
        k, l = xc @ xc.T, yc @ yc.T
        cross, xx, yy = (k * l).sum(), (k * k).sum(), (l * l).sum()
    else:
        cross = np.square(yc.T @ xc).sum()
        xx, yy = np.square(xc.T @ xc).sum(), np.square(yc.T @ yc).sum()
    denominator = np.sqrt(xx) * np.sqrt(yy)
    return float(cross / denominator) if denominator > 0 else 0.0


def hsic(k: np.ndarray, l: np.ndarray) -> float:
    """The (biased) Hilbert-Schmidt independence criterion of two n x n kernel matrices: tr(K H L H) / (n-1)^2."""
    n = len(k)
    h = np.eye(n) - np.full((n, n), 1.0 / n)
    return float(np.trace(k @ h @ l @ h)) / (n - 1) ** 2


def cosine_and_distance(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Mean cosine similarity and mean Euclidean distance of paired rows of two (n, d) arrays."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1)
    cos = (x * y).sum(axis=1) / np.maximum(norms, 1e-12)
    return float(cos.mean()), float(np.linalg.norm(x - y, axis=1).mean())


def kl_divergence(teacher_logits: np.ndarray, student_logits: np.ndarray) -> float:
    """Mean KL(softmax(teacher) || softmax(student)) over rows, in nats."""
    def log_softmax(z: np.ndarray) -> np.ndarray:
        z = np.asarray(z, dtype=np.float64)
        z = z - z.max(axis=1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    lt, ls = log_softmax(teacher_logits), log_softmax(student_logits)
    return float((np.exp(lt) * (lt - ls)).sum(axis=1).mean())
