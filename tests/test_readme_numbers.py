"""Every number the README shows comes from committed results (tools/readme_numbers.py): the
README's generated blocks must equal what the script makes of bench/results/ and of running
examples/dropin.py now."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("readme_numbers", ROOT / "tools" / "readme_numbers.py")
readme_numbers = importlib.util.module_from_spec(_spec)
sys.modules["readme_numbers"] = readme_numbers
_spec.loader.exec_module(readme_numbers)


def test_the_readme_agrees_with_the_committed_results() -> None:
    diffs = readme_numbers.disagreements(readme_numbers.README.read_text())
    assert not diffs, "README and results disagree (run python tools/readme_numbers.py):\n" + "\n".join(diffs)


def _as_committed(text: str) -> dict:
    """The script's blocks, with the drop-in example's taken from ``text`` (not run again)."""
    body = next(m.group("body") for m in readme_numbers.BLOCK.finditer(text) if m.group("name") == "dropin")
    return {**readme_numbers.BLOCKS, "dropin": lambda: body}


def test_a_number_edited_by_hand_is_caught() -> None:
    text = readme_numbers.README.read_text()
    start = text.index("<!-- readme_numbers: step_time -->")
    edited = text[:start] + text[start:].replace("x on the mlp", "1x on the mlp", 1)
    assert readme_numbers.disagreements(text, _as_committed(text)) == []
    (diff,) = readme_numbers.disagreements(edited, _as_committed(edited))
    assert "README.md: step_time" in diff and "1x on the mlp" in diff


def test_every_block_must_be_in_the_readme_and_known() -> None:
    text = readme_numbers.README.read_text()
    without = readme_numbers.BLOCK.sub(lambda m: "" if m.group("name") == "ext" else m.group(0), text)
    with pytest.raises(ValueError, match=r"missing \['ext'\]"):
        readme_numbers.render(without)
    stray = text + "\n<!-- readme_numbers: nope -->\n<!-- /readme_numbers: nope -->\n"
    with pytest.raises(ValueError, match=r"unknown \['nope'\]"):
        readme_numbers.render(stray)


def test_the_blocks_read_their_sources() -> None:
    """The computed sentences hold the sources' numbers (spot checks against the files)."""
    ext = readme_numbers.ext_block()
    assert "fused update is" in ext and "x as fast as a foreach-op loop" in ext
    step = readme_numbers.step_time_block()
    assert "on the mlp" in step and "double backprop" in step
    verify = readme_numbers.verify_block()
    assert verify.count("\n") > 5 and " 0 FAIL" in verify
    assert all(" reference " not in line for line in verify.splitlines()[4:-3])
    bench = readme_numbers.bench_block()
    assert "copy bandwidth" in bench and "appended" in bench


def test_the_which_table_picks_what_the_detail_tables_mark() -> None:
    """Each model's pick in the "which optimizer" table: on the demo's tasks the cell with the
    fewest steps, every cell being a configuration of that task in one of the demo's result
    files with that median; on the HF models the configuration the detail table marks (the
    lowest loss at the last step, bold there)."""
    which = readme_numbers.which_block()
    rows = [[c.strip() for c in line.split("|")[1:-1]]
            for line in which.splitlines() if line.startswith("| ") and "**" in line]
    picks = {row[0]: row[2].strip("*") for row in rows}
    names = readme_numbers.MODEL_NAMES
    runs: dict[tuple[str, str], float] = {}
    for file in readme_numbers.WHICH_DEMO_FILES:
        cells, _, _ = readme_numbers._cells(readme_numbers.RESULTS / file)
        for task, configs in cells.items():
            for label, m in configs.items():
                if m["steps_to_target"]["p50"]:
                    runs[(names[task], label)] = float(m["steps_to_target"]["p50"])
    demo = [row for row in rows if "(demo)" in row[0]]
    assert {row[0] for row in demo} == {names[t] for t in ("transformer", "mlp", "cnn")}
    for row in demo:
        shown = {}
        for cell in row[3:]:
            if cell != "—" and "seeds reached" not in cell:
                steps, label = cell.split(" (", 1)
                shown[label.rstrip(")")] = float(steps)
        for label, steps in shown.items():
            assert runs[(row[0], label)] == steps, (row[0], label)
        assert shown[picks[row[0]]] == min(shown.values()), row
    lowest = {line.split("|")[1].strip(): line.split("|")[2].strip()
              for line in readme_numbers.hf_lm_block().splitlines()
              if line.startswith("| ") and "**" in line.split("|")[-3]}
    assert {names[m]: label for m, label in lowest.items()} == {
        k: v for k, v in picks.items() if "Hugging Face" in k}
    assert len(picks) == 5
