"""Names a user reads in the MLflow UI: run names, short keys, table column names.

The UI cuts run names to about 20 characters in its lists and chart legends, so a sweep child is
named by its swept values with short keys (``lr=0.001 epochs=5``), in the order the user typed
them; the whole keys are in the run's params and in its ``tfharness.swept`` tag. Table columns
with a dot render empty in the UI, so table artifacts name their columns with ``_`` instead.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Sequence

# Short forms of the last part of a key; other keys keep their last part.
ABBREVIATIONS = {"learning_rate": "lr", "batch_size": "bs", "num_classes": "classes",
                 "num_samples": "samples"}
# Group prefixes that tell apart two swept keys with the same short form.
GROUP_ABBREVIATIONS = {"finetune": "ft", "trainer": "tr", "model": "model", "data": "data",
                       "save_format": "fmt", "source": "src", "sweep": "sweep"}
# Overrides that say where or how a run is recorded, not what it trains: left out of names.
OPERATIONAL_PREFIXES = ("tracking", "output_dir", "checkpoint_root", "print_report", "resume",
                        "hydra", "trainer.verbose")


def is_operational(key: str) -> bool:
    """Whether ``key`` (dotted) sets where or how a run is recorded rather than what it trains."""
    key = key.lstrip("+~")
    return any(key == p or key.startswith(p + ".") for p in OPERATIONAL_PREFIXES)


def short_keys(keys: Sequence[str]) -> Dict[str, str]:
    """A short, unique form of each dotted key: ``finetune.learning_rate`` -> ``lr``.

    Two keys with the same short form are told apart by their group (``ft.epochs``,
    ``tr.epochs``); keys still equal after that keep their whole name.
    """
    def last(key: str) -> str:
        part = key.lstrip("+~").rsplit(".", 1)[-1]
        return ABBREVIATIONS.get(part, part)

    def grouped(key: str) -> str:
        parts = key.lstrip("+~").split(".")
        if len(parts) == 1:
            return parts[0]
        return f"{GROUP_ABBREVIATIONS.get(parts[0], parts[0])}.{last(key)}"

    short = {k: last(k) for k in keys}
    for form in (grouped, lambda k: k.lstrip("+~")):
        counts: Dict[str, int] = {}
        for value in short.values():
            counts[value] = counts.get(value, 0) + 1
        short = {k: (form(k) if counts[v] > 1 else v) for k, v in short.items()}
    return short


def format_value(value: str) -> str:
    """A value as short as it reads unambiguously: ``1e-2`` -> ``0.01``, ``0.0010`` -> ``0.001``."""
    text = str(value).strip()
    try:
        number = float(text)
    except ValueError:
        return text.replace(" ", "")
    # Integers as typed: %g would write 1234567 as 1.23457e+06. Other numbers to six
    # significant digits; the run's params hold them whole.
    return text if text.lstrip("-").isdigit() else f"{number:g}"


def values_name(values: Dict[str, str], keys: Iterable[str]) -> str:
    """``lr=0.01 epochs=5``: the ``values`` of ``keys`` (dotted) with short keys, in order."""
    keys = [k for k in keys if k in values]
    short = short_keys(keys)
    return " ".join(f"{short[k]}={format_value(values[k])}" for k in keys)


def override_values(overrides: Iterable[str]) -> Dict[str, str]:
    """``{"finetune.learning_rate": "1e-2"}`` from ``key=value`` overrides, in order."""
    values: Dict[str, str] = {}
    for override in overrides:
        if "=" in override:
            key, value = override.split("=", 1)
            values[key.lstrip("+~")] = value
    return values


def run_name(overrides: Sequence[str], swept: Sequence[str] = (), fallback: str = "") -> str:
    """The name of a run: its swept values in a sweep, else what its command line changed.

    Args:
        overrides: the run's ``key=value`` overrides, as typed.
        swept: the keys a sweep varies (empty outside a sweep).
        fallback: the name when nothing was changed (``digits-mlp``).
    """
    values = override_values(overrides)
    if swept:
        keys = [k.lstrip("+~") for k in swept]
    else:
        keys = [k for k in values if not is_operational(k)]
    return values_name(values, keys) or fallback


def sweep_name(space: Dict[str, str]) -> str:
    """The parent run of a sweep, named by what it sweeps: ``sweep lr × epochs``."""
    short = short_keys(list(space))
    return "sweep " + " × ".join(short[k] for k in space) if space else "sweep"


def table_column(name: str) -> str:
    """A table column name the MLflow UI renders (it shows columns with a dot as empty)."""
    return str(name).replace(".", "_")


def table_columns(rows: List[Dict]) -> Dict[str, list]:
    """Rows as the column mapping ``log_table`` takes, with column names the UI renders."""
    columns: Dict[str, list] = {}
    for row in rows:
        for key, value in row.items():
            columns.setdefault(table_column(key), []).append(value)
    return columns
