"""hhdpo report: report.png + self-contained report.html from a run directory in the real formats."""

import base64
import json
import re
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

from hhdpo.core.config import load_config
from hhdpo.core.io import DataError
from hhdpo.evaluation import report as R
from hhdpo.evaluation.report_plot import PANELS
from hhdpo.training.tail import TailTest

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def verdicts(path, outcomes):
    write_jsonl(path, [{"idx": i, "prompt": f"q{i}", "judge_model": "fake-judge", "winner_model_vs_chosen": o}
                       for i, o in enumerate(outcomes)])


def make_run(tmp_path, steps=30, eval_every=10, tail=True, evaluated=True, adaptive=True):
    """A run directory as training and eval leave it: config.yaml, metrics.jsonl (train records like
    DPOTrainer._flush_window, eval/... records like DPOTrainer.evaluate), run_state.json, the tail test's
    own logs (written by hhdpo.training.tail.TailTest from synthetic margins) and the eval dir's summary.json."""
    save = tmp_path / "run"
    save.mkdir()
    cfg = {"run_dir": str(tmp_path), "policy_model": "smollm2",
           "dpo_training": {"save_dir": "run", "max_steps": steps, "learning_rate": 5e-6, "warmup_steps": 4},
           "tail_test": {"enabled": tail, "adaptive_beta": adaptive, "delta": 0.1},
           "HH_test": {"HH_test_policy_out": "run/eval/policy_out.jsonl"}}
    (save / "config.yaml").write_text(yaml.safe_dump(cfg))
    rng = np.random.default_rng(0)
    recs, beta = [], 0.1
    t = TailTest(SimpleNamespace(delta=0.1, lambda_=0.1, save_npy=False, adaptive_beta=adaptive, alpha=0.05,
                                 gamma=1.0, beta_min=0.01, beta_max=1.0), 4, beta, save / "logs" / "margins" if tail else None)
    for s in range(1, steps + 1):
        margins = rng.normal(0.05 * s, 0.1 + 0.01 * s, size=16)
        if tail:
            beta = t.update(margins, s, 0).get("beta", beta)
        ch, rj = 0.01 * s, -0.005 * s
        recs.append({"step": s, "epoch": s / 100, "loss": 0.69 - 0.01 * s + 0.01 * rng.standard_normal(),
                     "rewards/chosen": ch, "rewards/rejected": rj, "rewards/accuracies": min(1.0, 0.5 + 0.015 * s),
                     "logps/chosen": -100.0, "logps/rejected": -110.0, "rewards/margins": ch - rj,
                     "grad_norm": 15.0 - 0.2 * s, "lr": 5e-6 * min(1.0, s / 4), "beta": beta, "tokens/s": 20.0})
        if s % eval_every == 0:
            recs.append({"step": s, "eval/loss": 0.69 - 0.008 * s, "eval/rewards/chosen": ch, "eval/rewards/rejected": rj,
                         "eval/rewards/margins": ch - rj, "eval/rewards/accuracies": 0.5 + 0.01 * s, "eval/n": 36})
    write_jsonl(save / "metrics.jsonl", recs)
    (save / "run_state.json").write_text(json.dumps({"status": "completed", "step": steps, "total_steps": steps}))
    if evaluated:
        from hhdpo.evaluation.summarize import summarize, write_outputs

        ev = save / "eval"
        verdicts(ev / "policy_judged.jsonl", ["model"] * 14 + ["chosen"] * 14 + ["tie"] * 4)
        verdicts(ev / "base_judged.jsonl", ["model"] * 9 + ["chosen"] * 23)
        write_outputs(summarize([ev / "policy_judged.jsonl", ev / "base_judged.jsonl"], ["policy", "base"]), ev,
                      log=lambda _: None)
    return save


def embedded_png(page: str) -> bytes:
    m = re.search(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert m, "no embedded PNG"
    return base64.b64decode(m.group(1))


def test_report_of_a_full_run(tmp_path, capsys):
    save = make_run(tmp_path)
    assert R.cli([str(save)]) == 0
    png, page = (save / "report.png").read_bytes(), (save / "report.html").read_text()
    assert png[:8] == PNG_MAGIC and len(png) > 50_000
    assert embedded_png(page) == png  # self-contained: the same image inline
    for name in PANELS:
        assert f"<li>{name}" in page.replace("&quot;", '"')
    assert "Missing pieces" not in page
    # key numbers as text, from the records written above
    assert "completed at step 30 of 30" in page
    assert "validation (step 30, 36 pairs)" in page and "loss 0.45," in page  # 0.69 - 0.008 * 30
    assert "win rate vs HH chosen: policy</th><td>50.0%" in page  # 14 / (14 + 14)
    assert "win rate vs HH chosen: base</th><td>28.1%" in page  # 9 / 32
    assert "paired exact sign test" in page
    tail = [json.loads(x) for x in (save / "logs/margins/global_tail_test_and_beta_log.jsonl").read_text().splitlines()]
    over = sum(bool(r.get("risk_over")) for r in tail)
    assert f"p_hat &gt; delta on {over} of {len(tail) - 1} steps after warmup" in page
    assert f"tau_0 = {tail[0]['tau_0']:.4g}" in page


def test_write_report_takes_the_config(tmp_path):
    save = make_run(tmp_path, evaluated=False)
    cfg = load_config(save / "config.yaml")
    page = R.write_report(cfg, log=lambda _: None)
    assert page == save / "report.html" and (save / "report.png").is_file()
    # the same through --config with an override in any order
    (save / "report.html").unlink()
    assert R.cli(["tail_test.delta=0.2", "--config", str(save / "config.yaml")]) == 0
    assert "(delta = 0.2)" in (save / "report.html").read_text()


def test_missing_pieces_are_notes_not_errors(tmp_path):
    save = make_run(tmp_path, tail=False, evaluated=False)
    recs = [json.loads(x) for x in (save / "metrics.jsonl").read_text().splitlines()]
    # W&B-style keys absent: no grad_norm, no lr, no validation records
    # {} is what training logs for a validation set smaller than one batch: nothing, not an error
    write_jsonl(save / "metrics.jsonl", [{k: v for k, v in r.items() if k not in ("grad_norm", "lr")}
                                         for r in recs if "loss" in r] + [{}])
    assert R.cli([str(save)]) == 0
    page = (save / "report.html").read_text()
    assert embedded_png(page)[:8] == PNG_MAGIC
    assert "Missing pieces" in page
    assert "no tail-test logs in" in page and "no eval summary at" in page
    assert "no &#x27;grad_norm&#x27; or &#x27;lr&#x27; in metrics.jsonl" in page
    assert "no validation &#x27;eval/loss&#x27; records yet" in page
    assert "no eval yet: the win-rate chart appears" in page
    # before any training: only notes
    (save / "metrics.jsonl").unlink()
    (save / "run_state.json").unlink()
    assert R.cli([str(save)]) == 0
    assert "no training metrics at" in (save / "report.html").read_text()


@pytest.mark.parametrize("content, line, what", [
    ('{"step": 1, "loss": 0.69}\n{"step": 2, "loss": \n', 2, "malformed JSON"),
    ("", 1, "empty metrics file"),
    ('{"step": 1, "loss": 0.69}\n{"loss": 0.5}\n', 2, "without a numeric 'step'"),
])
def test_bad_metrics_exit_2_naming_the_line(tmp_path, capsys, content, line, what):
    save = make_run(tmp_path, evaluated=False)
    (save / "metrics.jsonl").write_text(content)
    assert R.cli([str(save)]) == 2
    err = capsys.readouterr().err
    assert f"{save / 'metrics.jsonl'}:{line}:" in err and what in err
    assert not (save / "report.html").exists()
    with pytest.raises(DataError):
        R.write_report(load_config(save / "config.yaml"))


def test_train_and_eval_hook_warns_instead_of_failing(tmp_path):
    save = make_run(tmp_path, evaluated=False)
    cfg = load_config(save / "config.yaml")
    said = []
    assert R.write_report_or_warn(cfg, log=said.append) == save / "report.html"
    (save / "report.html").unlink()
    (save / "metrics.jsonl").write_text('{"step": 1, "loss": 0.69}\n{oops\n')
    said.clear()
    assert R.write_report_or_warn(cfg, log=said.append) is None
    assert not (save / "report.html").exists()
    assert len(said) == 1 and "warning: report not written" in said[0] and f"{save / 'metrics.jsonl'}:2:" in said[0]


def test_bad_command_lines(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        R.cli([])
    assert e.value.code == 2
    assert R.cli([str(tmp_path)]) == 2  # no config.yaml there
    assert "config.yaml: not found" in capsys.readouterr().err
    assert R.cli([str(tmp_path / "nope")]) == 2
