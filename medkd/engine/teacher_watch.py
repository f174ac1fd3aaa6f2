"""Say when a student passes its teacher: a teacher weaker than its student teaches it nothing useful.

:class:`TeacherDiceWatch` is a trainer callback of distillation runs: it knows the teacher's validation
Dice (a single teacher's best validation Dice, for a set the best member's) and, after every validation
of the student, warns once when the student's best validation Dice passes it, with both figures. At the
end both figures (and the step the student passed the teacher, if it did) are added to ``result.json``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable

from medkd.storage import atomic_write_text
from medkd.teachers.manifest import open_teachers

log = logging.getLogger(__name__)


def teacher_validation_dice(teacher: str | Path) -> tuple[float | None, str]:
    """The teacher's validation Dice and what it is: one checkpoint's best, or a set's best member's."""
    members = open_teachers(teacher).members
    known = [m.val_dice for m in members if m.val_dice is not None]
    if not known:
        return None, "unknown (no validation Dice stored with the teacher)"
    if len(members) == 1:
        return known[0], "best validation Dice of the teacher"
    return max(known), f"best validation Dice of the set's {len(members)} members"


class TeacherDiceWatch:
    """Warns (once) when the student's best validation Dice passes ``teacher_dice``; ``warn`` receives the line."""

    def __init__(self, teacher_dice: float | None, warn: Callable[[str], Any] = log.warning):
        self.teacher_dice = teacher_dice
        self.warn = warn
        self.passed: dict[str, float] | None = None

    def check(self, student_dice: float, step: int) -> None:
        if self.teacher_dice is None or self.passed is not None or not student_dice > self.teacher_dice:
            return
        self.passed = {"step": step, "student_val_dice": float(student_dice)}
        self.warn(f"the student's validation Dice {student_dice:.4f} (step {step}) has passed its teacher's "
                  f"{self.teacher_dice:.4f}: the teacher is weaker than the student it teaches, so distillation pulls "
                  "the student towards worse outputs; train a better teacher (a longer budget, `medkd plan`) or "
                  "compare with a labels-only student")

    def on_step_end(self, trainer: Any, step: int, terms: Any) -> None:
        """Trainer callback: after a step that validated, compare the student's best validation Dice."""
        if step % trainer.config.train.val_every == 0 and trainer.fabric.is_global_zero:
            self.check(trainer.state["best_metric"], step)

    def finish(self, run_dir: Path, best_metric: float, steps: int) -> None:
        """After training (its final validation included): the last check, and both figures into result.json."""
        self.check(best_metric, steps)
        path = Path(run_dir) / "result.json"
        if path.is_file():
            result = json.loads(path.read_text())
            result.update(teacher_val_dice=self.teacher_dice, student_passed_teacher=self.passed)
            atomic_write_text(path, json.dumps(result, indent=1))
