"""On-device anomaly scoring behind one interface: rolling z-score (EWMA, numpy) and an ONNX model.

Both share :class:`Features`, a per-(device, metric) EWMA of mean and variance plus the length of
the current run of identical values (a stuck sensor). The EWMA scorer's score is the largest
absolute z-score of a reading's metrics; the ONNX scorer feeds the features of the simulator's
metrics to a small classifier (trained by ``scripts/train_edge_model.py``) and scores its
probability of a fault. ``decision`` is ``score >= threshold`` (per device when the twin sets one).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final, Protocol

import numpy as np
import numpy.typing as npt

from fieldmesh.core.errors import ConfigError, MissingDependency
from fieldmesh.edge.config import InferConfig
from fieldmesh.edge.frame import Frame, occurrence_groups

__all__ = [
    "DEFAULT_MODEL",
    "FEATURE_METRICS",
    "EwmaScorer",
    "Features",
    "NullScorer",
    "OnnxScorer",
    "Scorer",
    "make_scorer",
]

#: The model shipped with fieldmesh (trained on simulator data).
DEFAULT_MODEL: Final = Path(__file__).parent / "models" / "anomaly.onnx"
#: The metrics the shipped model was trained on, in feature order.
FEATURE_METRICS: Final = ("temperature", "humidity", "vibration")
_Z_CAP: Final = 50.0
_RUN_CAP: Final = 10.0


class _MState:
    def __init__(self, cap: int) -> None:
        self.mean = np.zeros(cap)
        self.var = np.zeros(cap)
        self.n = np.zeros(cap, dtype=np.int64)
        self.prev = np.full(cap, np.nan)
        self.run = np.zeros(cap)

    def grow(self, cap: int) -> None:
        for name in ("mean", "var", "n", "prev", "run"):
            old = getattr(self, name)
            new = np.full(cap, np.nan if name == "prev" else 0, dtype=old.dtype)
            new[: old.shape[0]] = old
            setattr(self, name, new)


class Features:
    """Per-(device, metric) rolling statistics, updated as readings are scored.

    Args:
        alpha: EWMA weight of a new reading.
        warmup: readings before a z-score is reported (z = 0 until then).
    """

    def __init__(self, *, alpha: float = 0.05, warmup: int = 20) -> None:
        self.alpha = alpha
        self.warmup = warmup
        self._cap = 0
        self._m: dict[str, _MState] = {}

    def _state(self, name: str, need: int) -> _MState:
        if need > self._cap:
            self._cap = max(need, 2 * self._cap, 64)
            for s in self._m.values():
                s.grow(self._cap)
        st = self._m.get(name)
        if st is None:
            st = self._m[name] = _MState(self._cap)
        return st

    def update(
        self, frame: Frame, metrics: tuple[str, ...] | None = None
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        """Score and then learn a frame: per row and metric, ``|z|`` (capped) and the run length.

        Returns two ``(rows, metrics)`` arrays; an absent metric has z = 0 and run = 0.
        """
        names = metrics if metrics is not None else tuple(frame.cols)
        n = len(frame)
        z = np.zeros((n, len(names)))
        run = np.zeros((n, len(names)))
        if n == 0:
            return z, run
        need = int(frame.dev.max()) + 1
        a = self.alpha
        for g in occurrence_groups(frame.dev):
            d = frame.dev[g]
            for j, name in enumerate(names):
                col = frame.cols.get(name)
                if col is None:
                    continue
                st = self._state(name, need)
                x = col[g]
                p = ~np.isnan(x)
                if not p.all():
                    g2, d2, x = g[p], d[p], x[p]
                else:
                    g2, d2 = g, d
                mu, var, cnt = st.mean[d2], st.var[d2], st.n[d2]
                sd = np.sqrt(var + 1e-12 + 1e-8 * mu * mu)
                warm = cnt >= self.warmup
                zz = np.where(warm, np.abs(x - mu) / sd, 0.0)
                same = x == st.prev[d2]
                r = np.where(same, st.run[d2] + 1, 0.0)
                z[g2, j] = np.minimum(zz, _Z_CAP)
                run[g2, j] = np.minimum(r, _RUN_CAP)
                # learn: clip outliers so a spike does not drag the baseline
                xc = np.where(warm, np.clip(x, mu - 4 * sd, mu + 4 * sd), x)
                first = cnt == 0
                delta = xc - mu
                st.mean[d2] = np.where(first, x, mu + a * delta)
                st.var[d2] = np.where(first, 0.0, (1 - a) * (var + a * delta * delta))
                st.n[d2] = cnt + 1
                st.prev[d2] = x
                st.run[d2] = r
        return z, run


class Scorer(Protocol):
    """An anomaly scorer: a score per reading (stateful: it learns as it scores)."""

    name: str
    default_threshold: float

    def score(self, frame: Frame) -> npt.NDArray[np.float64]:
        """Scores of the frame's rows, in row order."""
        ...


class NullScorer:
    """No scoring: every score is 0 and nothing is an anomaly."""

    name = "none"
    default_threshold = np.inf

    def score(self, frame: Frame) -> npt.NDArray[np.float64]:
        """All zeros."""
        return np.zeros(len(frame))


class EwmaScorer:
    """Rolling z-score: the largest ``|x - ewma_mean| / ewma_sd`` over a reading's metrics."""

    name = "ewma"
    default_threshold = 6.0

    def __init__(self, *, alpha: float = 0.05, warmup: int = 20) -> None:
        self.features = Features(alpha=alpha, warmup=warmup)

    def score(self, frame: Frame) -> npt.NDArray[np.float64]:
        """Max |z| per row."""
        z, _ = self.features.update(frame)
        return z.max(axis=1) if z.shape[1] else np.zeros(len(frame))


def feature_matrix(z: npt.NDArray[np.float64], run: npt.NDArray[np.float64]) -> npt.NDArray[np.float32]:
    """The model's input: ``log1p(|z|)`` and run length per metric (float32, rows x 2*metrics)."""
    return np.hstack([np.log1p(z), run]).astype(np.float32)


class OnnxScorer:
    """A small classifier exported to ONNX (run by onnxruntime) over :class:`Features`.

    Args:
        model_path: the ``.onnx`` file (default: the shipped model).
        alpha, warmup: of the feature statistics (the model was trained with the defaults).
    """

    name = "onnx"
    default_threshold = 0.5

    def __init__(self, model_path: Path | None = None, *, alpha: float = 0.05, warmup: int = 20) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise MissingDependency("onnxruntime", "edge-onnx") from exc
        path = Path(model_path or DEFAULT_MODEL)
        if not path.exists():
            raise ConfigError(f"infer.model_path: {path} does not exist", key="infer.model_path")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        try:
            self._sess = ort.InferenceSession(
                str(path), sess_options=opts, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:
            raise ConfigError(
                f"infer.model_path: {path} is not a usable ONNX model: {exc}", key="infer.model_path"
            ) from exc
        self._input = self._sess.get_inputs()[0].name
        outs = [o.name for o in self._sess.get_outputs()]
        self._prob = "probabilities" if "probabilities" in outs else outs[-1]
        self.features = Features(alpha=alpha, warmup=warmup)

    def predict(self, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
        """Fault probability of feature rows."""
        if x.shape[0] == 0:
            return np.zeros(0)
        prob: Any = self._sess.run([self._prob], {self._input: x})[0]
        return np.asarray(prob, dtype=np.float64)[:, 1]

    def score(self, frame: Frame) -> npt.NDArray[np.float64]:
        """Fault probability per row."""
        z, run = self.features.update(frame, FEATURE_METRICS)
        return self.predict(feature_matrix(z, run))


def make_scorer(cfg: InferConfig) -> EwmaScorer | OnnxScorer | NullScorer:
    """The scorer a config asks for."""
    if cfg.scorer == "ewma":
        return EwmaScorer(alpha=cfg.alpha, warmup=cfg.warmup)
    if cfg.scorer == "onnx":
        return OnnxScorer(cfg.model_path, alpha=cfg.alpha, warmup=cfg.warmup)
    return NullScorer()
