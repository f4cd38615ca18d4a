"""The shipped artifacts' cards are copies of model_cards/: `model_cards/<name>.md` is byte for byte
`blockpilot_hf/artifacts/<name>/README.md` (the card a shipped artifact folder carries). No model loads."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CARDS = ROOT / "model_cards"
ARTIFACTS = ROOT / "blockpilot_hf" / "artifacts"

CARD_NAMES = sorted(p.stem for p in CARDS.glob("*.md"))
ARTIFACT_NAMES = sorted(p.parent.name for p in ARTIFACTS.glob("*/README.md"))


def test_there_are_cards():
    assert CARD_NAMES, f"no model cards in {CARDS}"


def test_every_artifact_readme_has_a_card():
    missing = sorted(set(ARTIFACT_NAMES) - set(CARD_NAMES))
    assert not missing, f"artifact folders with a README.md but no model_cards/<name>.md: {missing}"


@pytest.mark.parametrize("name", CARD_NAMES)
def test_card_is_the_artifact_readme(name):
    card = CARDS / f"{name}.md"
    readme = ARTIFACTS / name / "README.md"
    assert readme.is_file(), f"{card.relative_to(ROOT)} has no {readme.relative_to(ROOT)}"
    a, b = card.read_bytes(), readme.read_bytes()
    if a != b:
        at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        line = a[:at].count(b"\n") + 1
        pytest.fail(
            f"{card.relative_to(ROOT)} and {readme.relative_to(ROOT)} differ from byte {at} (line {line} of the "
            f"card); copy the card over the README: cp {card.relative_to(ROOT)} {readme.relative_to(ROOT)}"
        )
