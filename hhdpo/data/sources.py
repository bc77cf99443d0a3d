"""Where HH records come from: a Hub id, a local copy of the Hub repository, or one file.

``Anthropic/hh-rlhf`` is four subsets (harmless-base, helpful-base, helpful-online,
helpful-rejection-sampled), each with ``train.jsonl.gz`` and ``test.jsonl.gz``. Loaded
whole, ``datasets`` puts them one after another, so a slice of the whole (``train[:10%]``)
is all harmless-base. Here a split's slice applies to each subset on its own and the
slices are concatenated: ``train[:10%]`` is the first 10% of every subset, ``test[:50]``
the first 50 of every subset. ``data_dirs`` picks subsets; ``[]`` means all of them.

The same plan serves the Hub and a local copy (``huggingface-cli download Anthropic/hh-rlhf
--repo-type dataset --local-dir DIR``): :func:`plan_parts` turns (source, split, data_dirs)
into one :class:`Part` per subset and :func:`split_bounds` cuts each part, so an offline
node with DIR sees exactly the pairs the Hub id gives. A single ``.jsonl[.gz]`` file is one
part named after the file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from hhdpo.core.config import ConfigError
from hhdpo.core.io import DataError, iter_jsonl

HH_HUB_ID = "Anthropic/hh-rlhf"
HH_SUBSETS = ("harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled")
DATA_SUFFIXES = (".jsonl", ".jsonl.gz", ".json")
# a subset folder holds files named after their split; red-team-attempts (another format) holds none
_SPLIT_FILES = ("train", "test")

_SLICE_RE = re.compile(r"^(?P<name>[A-Za-z_]+)(\[(?P<start>-?\d+%?)?:(?P<stop>-?\d+%?)?\])?$")
_SPLIT_HELP = "NAME or NAME[start:stop] with integers or percentages in [-100%, 100%], e.g. train[:10%]"


def _match(split: str) -> re.Match:
    m = _SLICE_RE.match(split)
    if m is None:
        raise ConfigError(f"split {split!r}: expected {_SPLIT_HELP}")
    return m


def split_name(split: str) -> str:
    return _match(split)["name"]


def split_bounds(n: int, split: str) -> tuple[int, int]:
    """[start, stop) of a datasets-style slice over ``n`` rows, clipped to [0, n].

    Percentages round to the closest row, as ``datasets`` does, so ``train[:10%]`` of one
    subset here is ``datasets``' own ``train[:10%]`` of that subset.
    """
    m = _match(split)

    def pos(v: str | None, default: int) -> int:
        if v is None:
            return default
        if v.endswith("%"):
            pct = int(v[:-1])
            if not -100 <= pct <= 100:
                raise ConfigError(f"split {split!r}: {v} is out of range; expected {_SPLIT_HELP}")
            i = round(n * pct / 100)
        else:
            i = int(v)
        return max(n + i, 0) if i < 0 else min(i, n)

    return pos(m["start"], 0), pos(m["stop"], n)


def slice_split(rows: list, split: str) -> list:
    """Apply a datasets-style slice (``train[:10%]``, ``test[100:200]``) to one list."""
    start, stop = split_bounds(len(rows), split)
    return rows[start:stop]


@dataclass(frozen=True)
class Part:
    """One subset's rows of one split: a local file, or a ``datasets.load_dataset`` call."""

    name: str  # subset name (harmless-base, ...) or, for a single file, the file name
    path: Path | None = None
    hub_kwargs: dict = field(default_factory=dict, hash=False)


def is_local(source: str) -> bool:
    """A path, not a Hub id (``name`` or ``owner/name``): a missing path then says so, offline."""
    return (source.endswith(DATA_SUFFIXES) or source.startswith(("/", ".", "~")) or source.count("/") > 1
            or Path(source).exists())


def _checked_dirs(data_dirs: list[str] | None, known: list[str] | tuple[str, ...] | None, where: str) -> list[str]:
    """``data_dirs`` as a list, each entry one of ``known`` (when known) and listed once."""
    dirs = list(data_dirs or [])
    for d in dirs:
        if dirs.count(d) > 1:
            raise ConfigError(f"data_dirs: {d!r} is listed twice")
        if known is not None and d not in known:
            raise ConfigError(f"data_dirs: {d!r} is not a subset of {where}; expected some of: {', '.join(known)}")
    return dirs or list(known or [])


def local_subsets(root: Path, name: str) -> list[str]:
    """Subset folders of a local copy: those holding a ``train``/``test``/NAME data file."""
    stems = {*_SPLIT_FILES, name}
    return sorted(d.name for d in root.iterdir()
                  if d.is_dir() and not d.name.startswith(".")
                  and any((d / f"{s}{suf}").is_file() for s in stems for suf in (".jsonl.gz", ".jsonl")))


def _local_parts(root: Path, name: str, data_dirs: list[str] | None) -> list[Part]:
    found = local_subsets(root, name)
    if not found:
        loose = sorted(p.name for p in root.glob("*.jsonl*"))
        hint = f"; it holds {', '.join(loose)} at its top level: name that file instead" if loose else ""
        raise DataError(f"{root}: no HH subsets found; expected a local copy of the Hub repository "
                        f"(SUBSET/train.jsonl.gz and SUBSET/test.jsonl.gz, e.g. {root / HH_SUBSETS[0] / 'train.jsonl.gz'}) "
                        f"or a .jsonl/.jsonl.gz file{hint}")
    parts = []
    for d in _checked_dirs(data_dirs, found, f"the local copy {root}"):
        files = [root / d / f"{name}{suf}" for suf in (".jsonl.gz", ".jsonl")]
        path = next((f for f in files if f.is_file()), None)
        if path is None:
            raise DataError(f"{root / d}: no {files[0].name} or {files[1].name} for split {name!r}")
        parts.append(Part(d, path=path))
    return parts


def hub_parts(source: str, name: str, data_dirs: list[str] | None) -> list[Part]:
    """One ``datasets.load_dataset`` call per subset, loading the whole split ``name``.

    For ``Anthropic/hh-rlhf`` no data_dirs means its four subsets. Another Hub id without
    data_dirs has no known subsets and is one part, loaded whole as before.
    """
    known = HH_SUBSETS if source.lower() == HH_HUB_ID.lower() else None
    dirs = _checked_dirs(data_dirs, known, source) or [None]
    return [Part(d or source, hub_kwargs={"path": source, "data_dir": d, "split": name}) for d in dirs]


def plan_parts(source: str, split: str, data_dirs: list[str] | None = None) -> list[Part]:
    """The parts ``load_parts`` reads for (source, split, data_dirs), without reading them."""
    name = split_name(split)
    if not is_local(source):
        return hub_parts(source, name, data_dirs)
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"{source}: data file or directory not found")
    if path.is_dir():
        return _local_parts(path, name, data_dirs)
    return [Part(path.name, path=path)]  # data_dirs selects subsets; one file has none (as before)


def load_parts(source: str, split: str, data_dirs: list[str] | None = None) -> list[tuple[str, list[tuple[str, dict]]]]:
    """[(part name, [(origin, record), ...]), ...]: each part's slice, in plan order.

    An origin is ``file:line`` for a local file, ``hub_id/subset/split:i`` for the Hub.
    """
    out = []
    for part in plan_parts(source, split, data_dirs):
        if part.path is not None:
            rows = [(f"{part.path}:{ln}", rec) for ln, rec in iter_jsonl(part.path)]
            out.append((part.name, slice_split(rows, split)))
            continue
        import datasets

        kw = part.hub_kwargs
        try:
            ds = datasets.load_dataset(**kw)
        except Exception as e:  # noqa: BLE001 - datasets raises many types; surface the source
            raise DataError(f"dataset {source!r} (data_dir={kw['data_dir']}, split={kw['split']}): {e}") from None
        start, stop = split_bounds(len(ds), split)
        prefix = f"{source}/{kw['data_dir'] or 'all'}/{kw['split']}"
        rows = ds.select(range(start, stop))
        out.append((part.name, [(f"{prefix}:{i}", rec) for i, rec in enumerate(rows, start)]))
    return out


def format_counts(counts: dict[str, int]) -> str:
    """``subsets: harmless-base=1043 helpful-base=1101`` (one line, in load order)."""
    return "subsets: " + " ".join(f"{k}={v}" for k, v in counts.items())
