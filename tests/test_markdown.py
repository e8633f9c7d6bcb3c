"""The one Markdown table writer: layout, escaping, alignment, and the tables built on it."""

from __future__ import annotations

import pytest

from qmargin_spk.calibration import calibration_table
from qmargin_spk.scoring import results_table
from qmargin_spk.utils.markdown import escape_cell, markdown_table


def test_table_layout_is_header_rule_and_one_line_per_row():
    table = markdown_table(["a", "b"], [["1", 2], [None, 3.5]])
    assert table == "| a | b |\n|---|---|\n| 1 | 2 |\n|  | 3.5 |"


def test_pipes_and_line_breaks_stay_inside_their_cell():
    table = markdown_table(["name|x"], [["two\nlines"], ["cr\r\nlf|and\rcr"]])
    assert table.splitlines() == ["| name\\|x |", "|---|", "| two lines |", "| cr lf\\|and cr |"]
    assert escape_cell("a|b|c") == "a\\|b\\|c" and escape_cell(None) == ""


def test_alignment_sets_the_rule_row():
    table = markdown_table(["l", "r", "c", "d"], [], align=["left", "right", "center", None])
    assert table == "| l | r | c | d |\n|:---|---:|:---:|---|"


@pytest.mark.parametrize(
    "header, rows, align, message",
    [
        (["a", "b"], [["1"]], None, "row 1 has 1 cells for 2 columns"),
        (["a"], [], ["left", "right"], "align has 2 entries for 1 columns"),
        (["a"], [], ["middle"], "unknown alignment 'middle'"),
        ([], [], None, "at least one column"),
    ],
)
def test_ragged_input_is_refused(header, rows, align, message):
    with pytest.raises(ValueError, match=message):
        markdown_table(header, rows, align)


def test_results_and_calibration_tables_are_written_by_it():
    metrics = {
        "eer": 0.125,
        "cllr": 0.5,
        "min_cllr": 0.25,
        "min_dcf": {"0.01": {"value": 0.5}},
        "act_dcf": {"0.01": {"value": 0.75}},
        "tar_at_far": {"0.01": {"tar": 0.9}},
    }
    entry = {"list": "a|b", "backend": "cosine", "n_trials": 8, "metrics": metrics}
    assert results_table([entry]) == (
        "| list | back-end | trials | EER % | minDCF@0.01 | TAR@FAR=0.01 % |\n|---|---|---|---|---|---|\n"
        "| a\\|b | cosine | 8 | 12.500 | 0.5000 | 90.00 |\n"
    )
    assert calibration_table([entry]) == (
        "| list | trials | EER % | Cllr | min Cllr | minDCF@0.01 | actDCF@0.01 |\n|---|---|---|---|---|---|---|\n"
        "| a\\|b | 8 | 12.500 | 0.5000 | 0.2500 | 0.5000 | 0.7500 |\n"
    )
