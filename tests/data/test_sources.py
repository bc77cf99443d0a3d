"""Where HH pairs come from: a local copy of the Hub repository built from the real HH file,
the Hub id (its per-subset load calls, and its loading run through ``datasets`` on that copy),
and a single file. A slice takes its share of every subset; data_dirs selects subsets."""

import gzip
import json

import pytest

from hhdpo.core.config import ConfigError
from hhdpo.core.io import DataError
from hhdpo.data.hh import load_pairs, seed_split
from hhdpo.data.sources import HH_SUBSETS, plan_parts, split_bounds

# (train, test) records per subset: different sizes, 2,312 in all (the real file's records in order)
SIZES = {"harmless-base": (700, 100), "helpful-base": (500, 300), "helpful-online": (300, 62),
         "helpful-rejection-sampled": (250, 100)}


def usable(rec: dict) -> bool:
    """The oracle for 'this record gives a pair', independent of split_pair: both sides share the
    prompt up to their own last assistant turn and answer it with different, non-empty text."""
    (pc, c), (pr, r) = seed_split(rec["chosen"]), seed_split(rec["rejected"])
    return pc == pr and bool(c.strip()) and bool(r.strip()) and c.strip() != r.strip()


@pytest.fixture(scope="module")
def lines(hh_file):
    with gzip.open(hh_file, "rt") as f:
        return [line for line in f if line.strip()]


@pytest.fixture(scope="module")
def copy(tmp_path_factory, lines):
    """DIR laid out like ``huggingface-cli download Anthropic/hh-rlhf --local-dir DIR``, with
    the repository's red-team-attempts folder (another format, not a subset) and .cache."""
    root = tmp_path_factory.mktemp("hh-rlhf")
    records, i = {}, 0
    for name, sizes in SIZES.items():
        for split, n in zip(("train", "test"), sizes):
            (root / name).mkdir(exist_ok=True)
            with gzip.open(root / name / f"{split}.jsonl.gz", "wt") as f:
                f.writelines(lines[i:i + n])
            records[name, split] = [json.loads(x) for x in lines[i:i + n]]
            i += n
    assert i == len(lines) == 2312
    (root / "red-team-attempts").mkdir()
    with gzip.open(root / "red-team-attempts" / "red_team_attempts.jsonl.gz", "wt") as f:
        f.write(json.dumps({"transcript": "\n\nHuman: hi\n\nAssistant: hello"}) + "\n")
    (root / ".cache" / "huggingface").mkdir(parents=True)
    return root, records


def expected(records, split: str, start, stop) -> dict[str, list[dict]]:
    """Each subset's records in [start, stop) as the test computes it (Python's own round)."""
    def bound(v, n, default):
        if v is None:
            return default
        return round(n * v[0] / 100) if isinstance(v, tuple) else v

    out = {}
    for name in SIZES:
        recs = records[name, split]
        out[name] = recs[bound(start, len(recs), 0):bound(stop, len(recs), len(recs))]
    return out


def check(pairs, want: dict[str, list[dict]]):
    """The pairs are exactly the usable records of each subset's slice, in order, labelled."""
    got = [(p.subset, p.prompt, p.chosen) for p in pairs]
    ref = [(name, *seed_split(r["chosen"])) for name, recs in want.items() for r in recs if usable(r)]
    ref = [(name, prompt, chosen.lstrip(" ")) for name, prompt, chosen in ref]
    assert got == ref


def test_oracle_agrees_with_the_whole_real_file(hh_file, lines):
    assert sum(usable(json.loads(x)) for x in lines) == len(load_pairs(str(hh_file), "train", log=None)[0]) == 2303


def test_a_slice_takes_its_share_of_every_subset(copy):
    root, records = copy
    logged = []
    pairs, _ = load_pairs(str(root), "train[:10%]", log=logged.append)
    want = expected(records, "train", None, (10,))
    assert {k: len(v) for k, v in want.items()} == {"harmless-base": 70, "helpful-base": 50, "helpful-online": 30,
                                                    "helpful-rejection-sampled": 25}
    check(pairs, want)
    counts = " ".join(f"{k}={sum(map(usable, v))}" for k, v in want.items())
    assert logged[-1] == f"[data] subsets: {counts}"
    assert counts.startswith("harmless-base=") and all(f"{k}=0" not in counts for k in SIZES)
    # the other slice forms, each per subset
    check(load_pairs(str(root), "test[-10%:]", log=None)[0], expected(records, "test", (-10,), None))
    check(load_pairs(str(root), "test[5:20]", log=None)[0], expected(records, "test", 5, 20))
    # helpful-online has 62 test records: none in [70:100], and the line says so
    pairs, _ = load_pairs(str(root), "test[70:100]", log=logged.append)
    want = expected(records, "test", 70, 100)
    check(pairs, want)
    assert logged[-1] == "[data] subsets: " + " ".join(f"{k}={sum(map(usable, v))}" for k, v in want.items())
    assert "helpful-online=0 " in logged[-1]
    check(load_pairs(str(root), "test", log=None)[0], expected(records, "test", None, None))


def test_data_dirs_select_subsets_in_their_order(copy):
    root, records = copy
    logged = []
    pairs, _ = load_pairs(str(root), "test[:50%]", ["helpful-online", "harmless-base"], log=logged.append)
    want = expected(records, "test", None, (50,))
    want = {k: want[k] for k in ("helpful-online", "harmless-base")}
    check(pairs, want)
    assert logged[-1] == f"[data] subsets: helpful-online={sum(map(usable, want['helpful-online']))} " \
                         f"harmless-base={sum(map(usable, want['harmless-base']))}"


def test_hub_id_plans_one_call_per_subset():
    parts = plan_parts("Anthropic/hh-rlhf", "train[:10%]", [])
    assert [(p.name, p.path, p.hub_kwargs) for p in parts] == [
        (d, None, {"path": "Anthropic/hh-rlhf", "data_dir": d, "split": "train"}) for d in HH_SUBSETS]
    parts = plan_parts("Anthropic/hh-rlhf", "test[:5]", ["helpful-base"])
    assert [p.hub_kwargs for p in parts] == [{"path": "Anthropic/hh-rlhf", "data_dir": "helpful-base", "split": "test"}]
    # another Hub id has no known subsets: one part, the whole split, as before
    assert [p.hub_kwargs for p in plan_parts("someone/hh-mirror", "train", [])] == [
        {"path": "someone/hh-mirror", "data_dir": None, "split": "train"}]


def test_hub_loading_gives_the_local_copys_pairs(copy, tmp_path, monkeypatch):
    """The Hub branch, with ``datasets.load_dataset`` answering each subset from the local copy
    (the json builder: real ``datasets`` loading, no network), selects the same pairs as the
    copy; and ``datasets``' own ``train[:10%]`` of a subset has the length we slice."""
    import datasets

    root, _ = copy
    real = datasets.load_dataset

    def from_copy(path, data_dir, split, **kw):
        assert path == "Anthropic/hh-rlhf" and data_dir in HH_SUBSETS and not kw
        return real("json", data_files=str(root / data_dir / f"{split}.jsonl.gz"), split="train",
                    cache_dir=str(tmp_path))

    monkeypatch.setattr(datasets, "load_dataset", from_copy)
    hub, _ = load_pairs("Anthropic/hh-rlhf", "train[:10%]", log=None)
    local, _ = load_pairs(str(root), "train[:10%]", log=None)
    assert [(p.subset, p.prompt, p.chosen, p.rejected) for p in hub] == \
           [(p.subset, p.prompt, p.chosen, p.rejected) for p in local]
    for name in HH_SUBSETS:
        theirs = real("json", data_files=str(root / name / "train.jsonl.gz"), split="train[:10%]",
                      cache_dir=str(tmp_path))
        assert split_bounds(SIZES[name][0], "train[:10%]") == (0, len(theirs))


def test_single_file_is_one_part_named_after_it(hh_file):
    logged = []
    pairs, _ = load_pairs(str(hh_file), "test[:10%]", ["harmless-base"], log=logged.append)  # data_dirs: no subsets
    assert logged[-1] == f"[data] subsets: {hh_file.name}={len(pairs)}" and {p.subset for p in pairs} == {hh_file.name}


def test_bad_input_names_what_was_expected(copy, tmp_path):
    root, _ = copy
    (tmp_path / "loose").mkdir()
    (tmp_path / "loose" / "hh.jsonl.gz").write_bytes(b"")
    with pytest.raises(DataError, match=r"loose: no HH subsets found; expected a local copy .*"
                                        r"harmless-base/train\.jsonl\.gz.*it holds hh\.jsonl\.gz at its top level"):
        load_pairs(str(tmp_path / "loose"), "train", log=None)
    with pytest.raises(ConfigError, match=r"data_dirs: 'red-team-attempts' is not a subset of the local copy .*"
                                          r"expected some of: harmless-base, helpful-base, helpful-online, "
                                          r"helpful-rejection-sampled"):
        load_pairs(str(root), "train", ["red-team-attempts"], log=None)
    with pytest.raises(ConfigError, match=r"data_dirs: 'helpful' is not a subset of Anthropic/hh-rlhf"):
        plan_parts("Anthropic/hh-rlhf", "train", ["helpful"])
    with pytest.raises(ConfigError, match=r"data_dirs: 'helpful-base' is listed twice"):
        plan_parts(str(root), "train", ["helpful-base", "helpful-base"])
    with pytest.raises(DataError, match=r"helpful-online: no validation\.jsonl\.gz or validation\.jsonl "
                                        r"for split 'validation'"):
        load_pairs(str(root), "validation", ["helpful-online"], log=None)
    for bad, why in (("train[:150%]", "150% is out of range"), ("train[a:b]", "expected NAME or NAME"),
                     ("train[:10%]+test", "expected NAME")):
        with pytest.raises(ConfigError, match=rf"split '{bad[:5]}.*{why}"):
            load_pairs(str(root), bad, log=None)
    with pytest.raises(DataError, match="data file or directory not found"):
        load_pairs(str(tmp_path / "nope"), "train", log=None)


def test_data_cli_prints_the_subsets_line_and_exits_2_on_a_bad_subset(copy):
    from tests.conftest import run_cli

    root, records = copy
    r = run_cli("data", "--config", "configs/smollm2_cpu.yaml", "--show", "1", f"dataset.dataset_name={root}",
                "dataset.subset=train[:10%]", "dataset.data_dirs=[]")
    assert r.returncode == 0, r.stderr
    want = expected(records, "train", None, (10,))
    assert "subsets: " + " ".join(f"{k}={sum(map(usable, v))}" for k, v in want.items()) in r.stdout.splitlines()
    r = run_cli("data", "--config", "configs/smollm2_cpu.yaml", f"dataset.dataset_name={root}",
                "dataset.data_dirs=[harmless-base,helpful]")
    assert r.returncode == 2 and "data_dirs: 'helpful' is not a subset of the local copy" in r.stderr, r.stderr
