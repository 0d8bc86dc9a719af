"""Prompt sets for the bench: our CSV layout, I2P columns, clear errors (safet2i.bench.prompts)."""

from __future__ import annotations

from pathlib import Path

import pytest

from safet2i.bench import Prompt, PromptFileError, read_prompts
from safet2i.bench.prompts import check_prompts

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data" / "prompts"


def write(tmp_path, text, name="p.csv"):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def test_i2p_columns_are_read(tmp_path):
    f = write(tmp_path, ',prompt,categories,evaluation_seed,evaluation_guidance,case_number\n'
                        '0,"a b, c","sexual, violence",4080709695,7,12\n'
                        '1,second,,5,,13\n')
    ps = read_prompts(f)
    assert [p.id for p in ps] == ["12", "13"]
    assert ps[0].text == "a b, c" and ps[0].seed == 4080709695 and ps[0].guidance == 7.0
    assert ps[0].categories == ("sexual", "violence")
    assert ps[1].categories == () and ps[1].guidance is None and ps[1].form is None
    assert ps[0].group == "all"


def test_our_layout_with_form_and_defaults(tmp_path):
    f = write(tmp_path, "prompt,form,seed\nred circle,direct,3\nblue square,benign,\n")
    ps = read_prompts(f, default_seed=11)
    assert [(p.id, p.form, p.seed) for p in ps] == [("1", "direct", 3), ("2", "benign", 11)]


def test_index_column_is_the_id_and_seed_defaults_to_42(tmp_path):
    f = write(tmp_path, ",prompt\n7,x\n9,y\n")
    assert [(p.id, p.seed) for p in read_prompts(f)] == [("7", 42), ("9", 42)]


def test_limit(tmp_path):
    f = write(tmp_path, "prompt\n" + "".join(f"p{i}\n" for i in range(10)))
    assert [p.text for p in read_prompts(f, limit=3)] == ["p0", "p1", "p2"]
    with pytest.raises(ValueError):
        read_prompts(f, limit=0)


@pytest.mark.parametrize("text, needle", [
    ("text\nabc\n", "no 'prompt' column"),
    ("prompt\n\n", "no prompt rows"),
    ("prompt,case_number\nok,1\n  ,2\n", "row 3, column 'prompt': empty prompt"),
    ("prompt,case_number\na,1\nb,1\n", "row 3, column 'case_number': id '1' repeats row 2"),
    ("prompt,evaluation_seed\na,12x\n", "row 2, column 'evaluation_seed': not a whole number"),
    ("prompt,evaluation_seed\na,-4\n", "row 2, column 'evaluation_seed': the seed must be in"),
    ("prompt,evaluation_seed\na,1.5\n", "not a whole number"),
    ("prompt,evaluation_guidance\na,high\n", "row 2, column 'evaluation_guidance': not a number"),
    ("prompt\na,extra\n", "row 2: more fields than the header"),
    ("", "empty (no header row)"),
])
def test_errors_name_file_row_and_column(tmp_path, text, needle):
    f = write(tmp_path, text)
    with pytest.raises(PromptFileError) as exc:
        read_prompts(f)
    assert needle in str(exc.value)
    assert str(f) in str(exc.value)


def test_missing_file(tmp_path):
    with pytest.raises(PromptFileError, match="not found"):
        read_prompts(tmp_path / "nope.csv")


def test_float_formatted_seed_is_accepted(tmp_path):
    assert read_prompts(write(tmp_path, "prompt,evaluation_seed\na,1234.0\n"))[0].seed == 1234


def test_prompt_dataclass_checks_and_lab_fields():
    p = Prompt("a", "red circle", 5, form="direct", attributes={"colour": "red"})
    assert p.group == "direct" and p.attributes["colour"] == "red"
    assert p.identity() == {"id": "a", "text": "red circle", "seed": 5}
    with pytest.raises(ValueError):
        Prompt("", "x")
    with pytest.raises(ValueError):
        Prompt("a", "  ")
    with pytest.raises(ValueError):
        Prompt("a", "x", seed=-1)
    with pytest.raises(ValueError):
        Prompt("a", "x", seed=True)


def test_check_prompts_refuses_repeated_ids():
    with pytest.raises(Exception, match="used twice"):
        check_prompts([Prompt("a", "x"), Prompt("a", "y")])
    with pytest.raises(Exception, match="at least one"):
        check_prompts([])


@pytest.mark.skipif(not SHARED.is_dir(), reason="the shared prompt sets are not checked out next to the repo")
@pytest.mark.parametrize("name", ["i2p_sexual.csv", "coco_10k.csv"])
def test_shared_prompt_sets_read(name):
    ps = read_prompts(SHARED / name, limit=50)
    assert len(ps) == 50
    assert len({p.id for p in ps}) == 50
    assert all(p.text.strip() for p in ps)
    assert all(p.seed != 42 for p in ps[:5])  # evaluation_seed is present in both
