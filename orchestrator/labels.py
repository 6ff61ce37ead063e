"""How trials and runs read to a person: short trial ids, "arm + searched values" labels, run names, and
text made safe for MLflow's markdown descriptions."""

import re

from palp_trainer.config import ALIGNMENT_ONLY

from .recipe import format_value

# knob -> how a label writes it: "α7.5", "r4", "lr=1e-4"
SYMBOLS = {"alpha": "α", "beta": "β", "rank": "r", "align_weight": "λ"}
ARMS = {"none": "baseline"}  # alignment: none is the paper's TI+DB baseline
RUN_NAME_LIMIT = 60
_MARKDOWN = re.compile(r"([\\`*_{}\[\]()#+!|<>~])")


def short_id(trial_id) -> str:
    """'12894_00001' -> '00001': Tune's trial index, unique within a sweep (the prefix names the sweep)."""
    return str(trial_id).rsplit("_", 1)[-1]


def trial_label(alignment: str, searched: dict) -> str:
    """The arm, then each searched knob's value: ('palp', {'alpha': 7.5, 'rank': 4}) -> 'palp α7.5 r4';
    the baseline arm leaves out PALP's own knobs ('baseline r4')."""
    parts = [ARMS.get(alignment, alignment)]
    for key, value in searched.items():
        if key in ("alignment", "pair", "steps") or (alignment == "none" and key in ALIGNMENT_ONLY):
            continue
        parts.append(f"{SYMBOLS[key]}{format_value(value)}" if key in SYMBOLS else f"{key}={format_value(value)}")
    return " ".join(parts)


def run_name(pair: str, trial_id, label: str, limit: int = RUN_NAME_LIMIT) -> str:
    """'00001 · palp α7.5 r4 · cat/a-sketch-of-v1': the short id first, so a narrow column never cuts it;
    the pair last, shortened to keep the name within `limit` characters."""
    head = f"{short_id(trial_id)} · {label} · "
    where = pair.replace("__", "/")
    room = max(limit - len(head), 8)
    return head + (where if len(where) <= room else where[:room - 1] + "…")


def md_escape(text) -> str:
    """`text` shown literally in markdown: '[V1] (cat)' stays '[V1] (cat)', not a link; '*' and '_' stay,
    not emphasis. Only inline syntax is escaped: escaped text never starts a line here."""
    return _MARKDOWN.sub(r"\\\1", str(text))


def md_plain(text: str) -> str:
    """A description written in markdown (md_escape'd text, emphasis, links, images, tables) as plain text for a
    terminal: `models show`."""
    lines = []
    for line in text.splitlines():
        if re.fullmatch(r"\|?(\s*:?-+:?\s*\|)+\s*:?-*:?\s*", line):  # a table's |---|---| rule
            continue
        line = re.sub(r"!\[([^\]]*)\]\([^)]*\)", r"(image: \1, in the MLflow UI)", line)
        line = re.sub(r"(?<!\\)\[((?:[^\]\\]|\\.)*)\]\([^)]*\)", r"\1", line)  # [text](link) -> text
        line = re.sub(r"(?<!\\)(\*\*|`)", "", line)
        if line.startswith("|") and line.endswith("|"):
            line = "  ".join(cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1])
        lines.append(re.sub(r"\\(.)", r"\1", line))
    return "\n".join(lines)
