"""GLUE metrics: ``evaluate.load("glue", task)``, or offline the sklearn/scipy formulas it wraps."""

from __future__ import annotations

from . import common


def _sklearn_scipy_metrics(task: str, preds: list, labels: list) -> dict[str, float]:
    """The same formulas as ``evaluate.load("glue", task)`` (sklearn / scipy calls)."""
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    if task == "stsb":
        return {"pearson": float(pearsonr(preds, labels)[0]), "spearmanr": float(spearmanr(preds, labels)[0])}
    if task == "cola":
        return {"matthews_correlation": float(matthews_corrcoef(labels, preds))}
    if task == "mrpc":
        return {"accuracy": float(accuracy_score(labels, preds)), "f1": float(f1_score(labels, preds))}
    return {"accuracy": float(accuracy_score(labels, preds))}


def _evaluate_metrics(task: str, preds: list, labels: list) -> dict[str, float]:
    import evaluate

    metric = evaluate.load("glue", task)
    return {k: float(v) for k, v in metric.compute(predictions=preds, references=labels).items()}


def compute_metrics(task: str, preds: list, labels: list, backend: str) -> tuple[dict[str, float], str]:
    """GLUE metrics and the backend that computed them (``evaluate`` or ``sklearn/scipy``)."""
    if backend == "evaluate" or (backend == "auto" and not common.hub_offline()):
        try:
            return _evaluate_metrics(task, preds, labels), "evaluate"
        except Exception as error:  # offline, or the metric script cannot be fetched
            if backend == "evaluate":
                raise
            print(f"evaluate.load('glue', {task!r}) failed ({type(error).__name__}); using sklearn/scipy")
    return _sklearn_scipy_metrics(task, preds, labels), "sklearn/scipy (evaluate's glue formulas, offline)"
