"""What a judge run did, per file and in all: counts, tokens, the budget, and whether it is complete."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from hhdpo.evaluation.judge_resume import describe_coverage


@dataclass
class FileStats:
    in_file: str
    out_file: str
    pairs: int = 0
    judged: int = 0  # written by this run (including errored)
    errors: int = 0
    skipped: int = 0  # already in out_file with a current verdict
    rejudged: dict = field(default_factory=dict)  # saved verdicts dropped, by reason
    left: int = 0  # not judged because the budget was hit or the run stopped
    both_orders: int = 0
    agree: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    coverage: dict = field(default_factory=dict)  # the file after this run (judge_resume.coverage)

    def line(self) -> str:
        s = f"{self.out_file}: judged {self.judged}, errors {self.errors}, skipped (already done) {self.skipped}"
        if self.left:
            s += f", left {self.left}"
        if self.both_orders:
            s += f", order agreement {self.agree}/{self.both_orders} ({self.agree / self.both_orders:.1%})"
        if self.coverage and not self.coverage["complete"]:
            s += f"; INCOMPLETE: {describe_coverage(self.coverage)}"
        return s


@dataclass
class RunStats:
    files: list = field(default_factory=list)
    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    budget_hit: Optional[str] = None
    planned: int = 0  # files asked for; those after a budget hit are not started

    @property
    def unstarted(self) -> int:
        return self.planned - len(self.files)

    @property
    def complete(self) -> bool:
        """Every file started and every pair in it judged without error."""
        return not self.unstarted and all(st.coverage.get("complete") for st in self.files)

    def incomplete_reason(self) -> str | None:
        """What is left, in words (None when complete)."""
        if self.complete:
            return None
        parts = [f"{st.out_file}: {describe_coverage(st.coverage)}" for st in self.files
                 if not st.coverage.get("complete")]
        if self.unstarted:
            parts.append(f"{self.unstarted} file(s) not started")
        if self.budget_hit:
            parts.append(f"budget hit: {self.budget_hit}")
        return "; ".join(parts)
