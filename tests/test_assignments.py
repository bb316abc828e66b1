"""The autograder tells right from wrong: for every part, the student copy scores 0 and the
solution full marks; a half-right answer gets part of the points."""
import json

import pytest

from minift import assignments as A
from minift.cli import main


@pytest.mark.parametrize("part", list(A.PARTS))
def test_student_copy_scores_zero_and_solution_full(part, tmp_path):
    student, solution = tmp_path / "student", tmp_path / "solution"
    A.export(student, [part])
    A.export(solution, [part], solution=True)
    src = (student / part / A.PARTS[part].source).read_text()
    assert "BEGIN SOLUTION" not in src and ("NotImplementedError" in src or "TORCH_CHECK(false" in src)
    low, high = A.grade(student), A.grade(solution)
    assert low["total"] == 0 and low["parts"][0]["total"] >= 1
    assert high["total"] == A.PARTS[part].points == high["max_total"]


def test_half_right_attention_gets_partial_points(tmp_path):
    A.export(tmp_path, ["attention"])
    f = tmp_path / "attention" / "attention.py"
    src = f.read_text().replace(
        'raise NotImplementedError(',
        'return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), -1) @ v  # ignores the mask\n    (')
    f.write_text(src)
    result = A.grade(tmp_path)
    assert result["parts"][0]["passed"] == 2 and result["total"] == 5.0


def test_cli_export_and_grade_json(tmp_path, capsys):
    assert main(["assignment", "export", str(tmp_path), "--part", "softmax_xent_backward", "--solution"]) == 0
    assert main(["assignment", "grade", str(tmp_path), "--json", str(tmp_path / "g.json")]) == 0
    out = capsys.readouterr().out
    assert "total" in out and "10.00 / 10" in out
    assert json.loads((tmp_path / "g.json").read_text())["total"] == 10


def test_marker_errors():
    with pytest.raises(ValueError, match="not closed"):
        A.strip_solutions("x = 1\n# BEGIN SOLUTION\ny = 2\n", "f.py")
    with pytest.raises(ValueError, match="no BEGIN SOLUTION"):
        A.strip_solutions("x = 1\n", "f.py")
    with pytest.raises(ValueError, match="unknown part"):
        A.export("/nonexistent", ["nope"])
