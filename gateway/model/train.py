"""Training loops for the OPT flow classifiers (torch): supervised, distillation, FL.

Everything here takes the model and a :class:`~gateway.model.data.FlowDataset` as
values and returns results; no files, no global state beyond torch's RNG, which each
call seeds itself (same seed, same data -> same weights).

Loss per row is weighted by the row's ``weight`` (a deduplicated row stands for that
many flows), compressed so that a prompt repeated 10,000 times does not drown a
3-flow label: each class gets a total mass of ``flows ** class_power`` shared by its rows
in proportion to ``weight ** weight_power`` (both 1.0 = the plain empirical risk).

Training runs torch on one thread by default: on a small shared CPU, more intra-op
threads than free cores makes these tiny matrix products many times slower.

Devices (:mod:`gateway.model.device`): ``train_epochs(device=...)`` moves the model to
that device (``None``: wherever it already is) and leaves it there; on CUDA forward
passes run under bfloat16/float16 autocast.  Row order is drawn on the CPU from the
seeded generator on every device, so a seed means the same batches everywhere.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from gateway.model.data import FlowDataset
from gateway.model.device import Precision, deterministic, model_device, predict_batch, resolve_device
from gateway.model.metrics import classification_report, detailed_labels, malicious_score, softmax

StepCallback = Callable[[int, dict[str, float], float], None]
"""``on_step(step, per_layer_grad_norms, loss)``; called after every optimiser step."""


@dataclass
class TrainResult:
    steps: int = 0
    epoch_losses: list[float] = field(default_factory=list)


def _seed_all(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))
    gen = torch.Generator()
    gen.manual_seed(seed)
    return gen


def layer_of(param_name: str) -> str:
    """The layer a parameter belongs to, for per-layer gradient norms.

    ``model.decoder.layers.3.fc1.weight`` -> ``layers.3``; embeddings, the final layer
    norm and the score head are layers of their own.
    """
    parts = param_name.split(".")
    if "layers" in parts:
        i = parts.index("layers")
        return f"layers.{parts[i + 1]}"
    if "embed_tokens" in parts or "embed_positions" in parts:
        return "embeddings"
    if "final_layer_norm" in parts:
        return "final_layer_norm"
    if parts[0] == "score":
        return "score"
    return parts[-2] if len(parts) > 1 else parts[0]


def grad_norms_by_layer(model: torch.nn.Module) -> dict[str, float]:
    sq: dict[str, list[torch.Tensor]] = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            sq.setdefault(layer_of(name), []).append(p.grad.detach().float().pow(2).sum())
    if not sq:
        return {}
    # one device-to-host copy for all layers (a GPU would otherwise sync per tensor)
    sums = torch.stack([torch.stack(v).sum() for v in sq.values()]).cpu().tolist()
    return {k: math.sqrt(v) for k, v in zip(sq, sums)}


def train_epochs(
    model: torch.nn.Module,
    dataset: FlowDataset,
    *,
    epochs: int,
    lr: float,
    seed: int,
    batch_size: int = 128,
    weight_decay: float = 0.01,
    weight_power: float = 0.5,
    class_power: float = 0.25,
    threads: int | None = 1,
    teacher_logits: np.ndarray | None = None,
    temperature: float = 2.0,
    alpha: float = 0.7,
    prox_mu: float = 0.0,
    missing_class_scale: float = 1.0,
    label_smoothing: float = 0.0,
    device: str | torch.device | None = None,
    amp: bool = True,
    warmup: float = 0.1,
    on_step: StepCallback | None = None,
    on_epoch: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Train ``model`` in place for ``epochs`` passes over ``dataset`` (AdamW).

    With ``teacher_logits`` (``float[N, C]``, rows aligned with ``dataset``) the loss is
    distillation: ``alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE``.
    ``on_step`` receives per-layer gradient norms (for the GSFS gradient trigger);
    ``on_epoch(epoch, mean_loss)`` drives progress bars.  ``prox_mu`` > 0 adds FedProx's
    proximal term ``prox_mu / 2 * ||w - w_start||^2`` (w_start: the weights the call
    began with, i.e. the global model in federated learning), which bounds how far a
    client with non-IID data drifts from the global model in one session.  ``threads``
    sets torch's intra-op threads for the call (``None``: leave as is).  The model is left in eval mode.

    ``missing_class_scale`` < 1 is FedRS's restricted softmax (Li & Zhan, KDD 2021): while
    training, the logits of classes with no row in ``dataset`` are multiplied by it, so a
    gateway that has only seen benign traffic sharpens "benign" without also teaching the
    shared classifier that DDoS or C&C do not exist (0 = those logits are held at 0,
    1 = plain softmax).

    ``label_smoothing`` in [0, 1) mixes that share of a uniform distribution into the
    cross-entropy target, so the loss stops rewarding ever larger logits once a flow is
    classified with confidence; a federated session then moves the shared weights only
    as far as its own flows need, not as far as 50 Adam steps can push them.

    ``device`` (``auto``, ``cpu``, ``cuda``, ``cuda:N`` or a ``torch.device``; None: where
    the model is) is where training runs; the model stays there.  ``amp`` turns CUDA
    autocast on (bfloat16, or float16 with loss scaling); it changes nothing on the CPU.
    """
    if epochs < 0 or lr <= 0 or batch_size < 1:
        raise ValueError("epochs must be >= 0, lr > 0 and batch_size >= 1")
    if not 0.0 <= alpha <= 1.0 or temperature <= 0:
        raise ValueError("alpha must be in [0, 1] and temperature > 0")
    if not 0.0 <= prox_mu < math.inf:
        raise ValueError("prox_mu must be finite and >= 0")
    if not 0.0 <= missing_class_scale <= 1.0:
        raise ValueError("missing_class_scale must be in [0, 1]")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError("label_smoothing must be in [0, 1)")
    if not 0.0 <= warmup <= 1.0:
        raise ValueError("warmup must be in [0, 1]")
    if teacher_logits is not None and len(teacher_logits) != len(dataset):
        raise ValueError("teacher_logits must have one row per dataset row")
    result = TrainResult()
    if device is not None:
        model.to(resolve_device(device))
    if len(dataset) == 0 or epochs == 0:
        model.eval()
        return result
    with torch_threads(threads):
        return _train(
            model, dataset, epochs=epochs, lr=lr, seed=seed, batch_size=batch_size,
            weight_decay=weight_decay, weights=row_weights(dataset, weight_power, class_power),
            teacher_logits=teacher_logits, temperature=temperature, alpha=alpha, prox_mu=prox_mu,
            missing_class_scale=missing_class_scale, label_smoothing=label_smoothing, on_step=on_step,
            on_epoch=on_epoch, result=result, amp=amp, warmup=warmup,
        )


def row_weights(dataset: FlowDataset, weight_power: float, class_power: float) -> np.ndarray:
    """Per-row loss weights: class c gets mass ``flows_c ** class_power`` shared by its
    rows in proportion to ``weight ** weight_power``."""
    w = np.clip(dataset.weight.astype(np.float64), 0, None)
    shaped = w**weight_power
    out = np.zeros_like(shaped)
    for c in np.unique(dataset.y):
        rows = dataset.y == c
        denom = shaped[rows].sum()
        if denom > 0:
            out[rows] = shaped[rows] / denom * w[rows].sum() ** class_power
    return out.astype(np.float32)


def warmup_cosine(total_steps: int, *, warmup: float = 0.1, floor: float = 0.05) -> Callable[[int], float]:
    """LR factor: linear warm-up over ``warmup`` of the steps, then cosine down to
    ``floor``; well defined for any number of steps (one-step federated rounds too)."""
    n_warm = max(1, int(warmup * total_steps))

    def factor(step: int) -> float:
        if step < n_warm:
            return (step + 1) / n_warm
        progress = (step - n_warm) / max(1, total_steps - n_warm)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


@contextmanager
def torch_threads(n: int | None):
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _train(model, dataset, *, epochs, lr, seed, batch_size, weight_decay, weights, teacher_logits,
           temperature, alpha, prox_mu, missing_class_scale, label_smoothing, on_step, on_epoch,
           result, amp=True, warmup=0.1) -> TrainResult:
    dev = model_device(model)
    deterministic(dev)
    precision = Precision.for_device(dev, amp=amp)
    scaler = precision.scaler()
    gen = _seed_all(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    anchor = [p.detach().clone() for p in params] if prox_mu > 0 else None
    ids = torch.from_numpy(dataset.ids).to(dev)
    mask = torch.ones_like(ids)
    y = torch.from_numpy(dataset.y).to(dev)
    w = torch.from_numpy(weights).to(dev)
    t_logits = None if teacher_logits is None else torch.from_numpy(np.asarray(teacher_logits, np.float32)).to(dev)
    logit_scale = _missing_class_logit_scale(dataset, model, missing_class_scale)
    if logit_scale is not None:
        logit_scale = logit_scale.to(dev)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    total_steps = epochs * math.ceil(len(dataset) / batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(total_steps, warmup=warmup))
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(dataset), generator=gen).to(dev)
        losses = []
        for start in range(0, len(order), batch_size):
            b = order[start : start + batch_size]
            with precision.autocast():
                logits = model(input_ids=ids[b], attention_mask=mask[b]).logits
            logits = logits.float()  # the loss in float32 on every device
            if logit_scale is not None:
                logits = logits * logit_scale
            wb = w[b]
            ce = F.cross_entropy(logits, y[b], reduction="none", label_smoothing=label_smoothing)
            if t_logits is not None:
                log_s = F.log_softmax(logits / temperature, dim=-1)
                p_t = F.softmax(t_logits[b] / temperature, dim=-1)
                kl = (p_t * (torch.log(p_t.clamp_min(1e-12)) - log_s)).sum(-1) * temperature**2
                per_row = alpha * kl + (1 - alpha) * ce
            else:
                per_row = ce
            loss = (per_row * wb).sum() / wb.sum().clamp_min(1e-12)
            if anchor is not None:
                loss = loss + 0.5 * prox_mu * sum(((p - a) ** 2).sum() for p, a in zip(params, anchor))
            opt.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(opt)
            else:
                loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 5.0)
            norms = grad_norms_by_layer(model) if on_step is not None else None
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            sched.step()
            result.steps += 1
            losses.append(loss.detach())
            if on_step is not None:
                on_step(result.steps, norms, float(losses[-1]))
        mean = float(torch.stack(losses).mean()) if losses else float("nan")
        result.epoch_losses.append(mean)
        if on_epoch is not None:
            on_epoch(epoch + 1, mean)
    model.eval()
    return result


def _missing_class_logit_scale(dataset: FlowDataset, model: torch.nn.Module, scale: float) -> torch.Tensor | None:
    """Per-class logit factors for FedRS: 1 for classes with weighted rows, ``scale``
    for the others; None when nothing would change."""
    n_classes = int(getattr(getattr(model, "config", None), "num_labels", 0) or 0)
    if scale >= 1.0 or n_classes == 0:
        return None
    present = np.zeros(n_classes, bool)
    present[np.unique(dataset.y[dataset.weight > 0])] = True
    if present.all():
        return None
    return torch.from_numpy(np.where(present, 1.0, scale).astype(np.float32))


def predict_logits(model: torch.nn.Module, ids: np.ndarray, *, batch_size: int | None = None,
                   threads: int | None = 1) -> np.ndarray:
    """Torch logits ``float32[N, C]`` for token id rows, in float32 on the model's device
    (``batch_size``: rows per pass, default sized for that device)."""
    model.eval()
    dev = model_device(model)
    batch_size = batch_size or predict_batch(dev)
    out = []
    with torch_threads(threads), torch.inference_mode():
        for start in range(0, len(ids), batch_size):
            chunk = torch.from_numpy(np.ascontiguousarray(ids[start : start + batch_size])).to(dev)
            out.append(model(input_ids=chunk, attention_mask=torch.ones_like(chunk)).logits.float().cpu().numpy())
    if not out:
        n_labels = getattr(getattr(model, "config", None), "num_labels", 0)
        return np.zeros((0, n_labels), np.float32)
    return np.concatenate(out)


def evaluate(model: torch.nn.Module, dataset: FlowDataset, *, threshold: float = 0.5, labels: list[str] | None = None) -> dict:
    """Metrics of the torch model on ``dataset`` (weighted by row weight):
    ``accuracy``, ``precision``, ``recall``, ``f1`` (binary, malicious = positive),
    ``label_accuracy``, ``macro_f1``, ``per_label``, ``confusion``."""
    logits = predict_logits(model, dataset.ids)
    names = labels or [model.config.id2label[i] for i in range(model.config.num_labels)]
    probs = softmax(logits.astype(np.float64))
    return classification_report(
        dataset.y, detailed_labels(probs, threshold), malicious_score(probs), names, threshold=threshold,
        weight=dataset.weight,
    )


def state_to_numpy(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """Every parameter and buffer as float32 numpy copies, keyed by torch name."""
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def load_numpy_state(model: torch.nn.Module, arrays: dict[str, np.ndarray]) -> None:
    """Load arrays from :func:`state_to_numpy` (names, shapes and dtypes must match)."""
    own = model.state_dict()
    missing = sorted(set(own) - set(arrays))
    extra = sorted(set(arrays) - set(own))
    if missing or extra:
        raise ValueError(f"state mismatch: missing {missing[:5]}, unexpected {extra[:5]}")
    for k, v in own.items():
        a = np.asarray(arrays[k])
        if tuple(a.shape) != tuple(v.shape):
            raise ValueError(f"state mismatch: {k} has shape {a.shape}, model expects {tuple(v.shape)}")
        if not np.all(np.isfinite(a)):
            raise ValueError(f"state mismatch: {k} holds non-finite values")
    model.load_state_dict({k: torch.from_numpy(np.asarray(arrays[k], dtype=np.float32).copy()).to(own[k].dtype) for k in own})
    model.eval()
