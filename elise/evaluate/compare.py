"""``compare=[a/eval_report.json,b/eval_report.json]``: two reports side by side, with the paired
difference (b - a) over the utterances both scored and whether it is significant (paired bootstrap)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from elise.evaluate.report import LABELS, LOWER_IS_BETTER, fmt
from elise.evaluate.stats import paired_difference

PAIRED = ("wer", "cer", "sim", "mos", "eos", "duration_ratio", "rtf")


def load_report(path: str | Path) -> dict[str, Any]:
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / "eval_report.json"
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read eval report {path}: {err}") from err
    if not isinstance(report, dict) or "items" not in report:
        raise ValueError(f"{path} is not an eval_report.json (no 'items')")
    return report


def _key(row: dict[str, Any]) -> tuple[str, Any]:
    return row["text"], row.get("voice")


def compare(a: dict[str, Any], b: dict[str, Any], resamples: int = 2000) -> dict[str, Any]:
    """Per metric: both means over the paired items, the difference b - a, its interval, significance."""
    rows_a = {_key(r): r for r in a["items"]}
    pairs = [(rows_a[_key(r)], r) for r in b["items"] if _key(r) in rows_a]
    out: dict[str, Any] = {"paired_items": len(pairs), "metrics": {}}
    for key in PAIRED:
        both = [(x[key], y[key]) for x, y in pairs if x.get(key) is not None and y.get(key) is not None]
        if not both:
            continue
        va, vb = [float(x) for x, _ in both], [float(y) for _, y in both]
        out["metrics"][key] = {"a": sum(va) / len(va), "b": sum(vb) / len(vb),
                               **paired_difference(va, vb, resamples)}  # fmt: skip
    return out


HIGHER_IS_BETTER = {"sim", "mos", "eos"}


def verdict(key: str, m: dict[str, Any]) -> str:
    """ "no difference", "b better"/"b worse", or "b higher"/"b lower" where neither way is better
    (duration_ratio: closest to the voice's own pace is best)."""
    if not m["significant"]:
        return "no difference"
    if key in LOWER_IS_BETTER | HIGHER_IS_BETTER:
        return "b better" if (m["diff"] < 0) == (key in LOWER_IS_BETTER) else "b worse"
    return "b higher" if m["diff"] > 0 else "b lower"


def table(result: dict[str, Any], name_a: str, name_b: str) -> str:
    lines = [f"a = {name_a}", f"b = {name_b}", f"{result['paired_items']} utterances in both", "",
             "| metric | a | b | b - a | 95 % interval | verdict |", "|---|---|---|---|---|---|"]  # fmt: skip
    for key, m in result["metrics"].items():
        label = "EOS rate" if key == "eos" else LABELS.get(key, key)
        lines.append(f"| {label} | {fmt(m['a'])} | {fmt(m['b'])} | {m['diff']:+.3f} | "
                     f"{fmt(m['low'])} - {fmt(m['high'])} | {verdict(key, m)} |")  # fmt: skip
    return "\n".join(lines)
