"""The house rules hold (issue 26): no function over 60 lines outside Triton kernels, no module over 500 lines,
no raw store attributes outside stores/, no backslash continuations (tools/house.py states and checks them)."""
from pathlib import Path

from _scripts import load_script


def _house():
    return load_script(Path("tools") / "house.py")


def test_the_code_keeps_the_house_rules():
    assert _house().breaches() == []


def test_the_check_finds_each_kind_of_breach(tmp_path):
    house = _house()
    (tmp_path / "pipeline").mkdir()
    long_body = "\n".join(f"    x{i} = {i}" for i in range(61))
    (tmp_path / "pipeline" / "big.py").write_text(
        f"def long():\n{long_body}\n" + "\n" * 440 + "k = store.attrs['k']\ny = 1 + \\\n    2\n")
    found = house.breaches(tmp_path)
    assert any("long is 62 lines" in line for line in found)
    assert any("lines (at most 500)" in line for line in found)
    assert any("raw store attrs" in line for line in found)
    assert any("backslash continuation" in line for line in found)
