"""A gateway's local training data: the labelled flows in its store.

Labels come from labelled logs (IoT-23 ``label`` / ``detailed-label`` columns, stored
with the flow), from analyst feedback (``fedgate feedback UID LABEL``) and, where the
gateway asks for it (``[escalation] use_as_label``), from the cloud teacher's verdicts
on escalated flows; feedback wins over the log's label, and both over the teacher's.
Repository functions take the session; the caller opens it.
"""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy.orm import Session

from gateway.flows.record import ConnRecord
from gateway.model.labels import BENIGN, MALICIOUS, record_label
from gateway.store import repository as repo


def feedback_class(label: str) -> str:
    """An analyst's label as a class name: 'benign'/'malicious' in any case map to the
    base classes; anything else is a detailed label (unknown ones train as Malicious)."""
    text = label.strip()
    low = text.lower()
    if low == "benign":
        return BENIGN
    if low == "malicious":
        return MALICIOUS
    return text


def merge_labels(
    records: Iterable[ConnRecord], feedback: Iterable[tuple[ConnRecord, str]],
    teacher: Iterable[tuple[ConnRecord, str]] = (),
) -> tuple[list[ConnRecord], list[str]]:
    """Labelled records and their class names; feedback overrides (or adds) labels, and
    ``teacher`` verdicts label flows that have neither feedback nor a log label.

    PURE. A flow is identified by (uid, ts) here: the store's (source, uid) key is not
    part of a ConnRecord, and a uid repeated at the same time stamp is the same flow.
    """
    feedback = list(feedback)
    fb = {(r.uid, r.ts): feedback_class(lab) for r, lab in feedback}
    for r, lab in teacher:
        fb.setdefault((r.uid, r.ts), None)
        if record_label(r) is None and fb[(r.uid, r.ts)] is None:
            fb[(r.uid, r.ts)] = feedback_class(lab)
            feedback.append((r, lab))
    fb = {k: v for k, v in fb.items() if v is not None}
    out_records: list[ConnRecord] = []
    out_labels: list[str] = []
    seen: set[tuple[str, float]] = set()
    for r in records:
        key = (r.uid, r.ts)
        seen.add(key)
        cls = fb.get(key) or record_label(r)
        if cls is None:
            continue
        out_records.append(r)
        out_labels.append(cls)
    for r, lab in feedback:  # feedback on flows not in `records` (e.g. a limit cut them)
        key = (r.uid, r.ts)
        if key not in seen:
            seen.add(key)
            out_records.append(r)
            out_labels.append(fb[key])
    return out_records, out_labels


def load_labelled(session: Session, *, limit: int | None = None,
                  teacher_labels: bool = False) -> tuple[list[ConnRecord], list[str]]:
    """All labelled flows of the store with their classes (feedback applied; with
    ``teacher_labels`` the teacher's verdicts label what nothing else does)."""
    teacher = repo.teacher_labels(session) if teacher_labels else ()
    return merge_labels(repo.load_records(session, limit=limit), repo.labelled_feedback(session), teacher)
