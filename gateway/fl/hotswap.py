"""Put a newly received global model into the running detector without stopping it.

The FL client calls an :class:`EngineHotSwap` as its ``on_global`` hook after it loaded
the verified weights into the torch student. The hook writes a complete model
directory (weights, tokenizer, labels, metadata, ONNX export) for that version and
hands it to :meth:`gateway.inference.InferenceEngine.swap`, which validates and loads
it aside and then switches atomically: flows being classified finish on the old
session, the next batch uses the new one, none is dropped or classified twice. If the
export or the swap fails, the engine keeps serving the model it had.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

log = logging.getLogger(__name__)


class EngineHotSwap:
    """``on_global`` hook: export version ``v`` to ``models_dir/global-v`` and swap it in.

    keep: model directories kept on disk (the newest ones; the active one is never removed).
    """

    def __init__(self, *, engine, learner, models_dir: str | Path, keep: int = 3):
        if keep < 1:
            raise ValueError("keep must be >= 1")
        self.engine = engine
        self.learner = learner
        self.models_dir = Path(models_dir)
        self.keep = keep
        self.swapped: list[int] = []

    def __call__(self, version: int, weights, metrics: dict) -> Path:
        from gateway.model.modeldir import save_model_dir

        out = self.models_dir / f"global-{version}"
        parent = f"global-{self.swapped[-1]}" if self.swapped else self.engine.model_version
        # the alert threshold chosen on validation data stays with the detector, and the
        # graph of the precision it runs is written too (fp16 / int8 beside fp32)
        precision = getattr(self.engine, "precision", "fp32")
        save_model_dir(self.learner.model, self.learner.tokenizer, self.learner.labels, out,
                       version=f"global-{version}", parent=parent, threshold=self.engine.threshold,
                       metrics={k: float(v) for k, v in metrics.items()}, extra={"source": "federated"}, onnx=True,
                       int8=precision == "int8", fp16=precision == "fp16")
        self.engine.swap(out)
        self.swapped.append(version)
        self._prune()
        log.info("detector now runs global model %d (%s)", version, out)
        return out

    def _prune(self) -> None:
        dirs = sorted((p for p in self.models_dir.glob("global-*") if p.is_dir()),
                      key=lambda p: int(p.name.split("-", 1)[1]) if p.name.split("-", 1)[1].isdigit() else -1)
        for old in dirs[: max(0, len(dirs) - self.keep)]:
            shutil.rmtree(old, ignore_errors=True)
