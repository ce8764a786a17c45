"""The chapters' shape, checked on the committed notebooks (their execution is nbval's
job).

Every chapter opens with what the reader will learn and how long it runs, points its
Colab badge and its Colab set-up
cell at the repository named once in ``_config.yml``, and closes with a summary and two
to four exercises.
"""

import json
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
REPOSITORY = yaml.safe_load((ROOT / "_config.yml").read_text(encoding="utf8"))[
    "repository"
]["url"]


def cells(path):
    return json.loads(path.read_text(encoding="utf8"))["cells"]


def source(cell):
    return "".join(cell["source"])


def test_there_are_the_chapters_and_the_latent_explorer():
    chapters = [f"{n:02}" for n in range(1, 8)]
    explorer = ["08"]  # the latent explorer (the website's interactive page)
    assert [path.name[:2] for path in NOTEBOOKS] == chapters + explorer


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_colab_badge_and_setup_cell_point_at_the_repository_of_config(path):
    first, setup = source(cells(path)[0]), source(cells(path)[1])
    owner_and_name = REPOSITORY.removeprefix("https://github.com/")
    badge = f"https://colab.research.google.com/github/{owner_and_name}/blob/main/notebooks/{path.name}"
    assert badge in first, (
        f"{path.name}: the first cell's Colab badge should link to {badge}"
    )
    assert (
        cells(path)[1]["cell_type"] == "code"
        and '"google.colab" in sys.modules' in setup
    )
    assert f"git clone --depth 1 {REPOSITORY} " in setup, (
        f"{path.name}: the Colab cell should clone {REPOSITORY}"
    )
    other_urls = set(
        re.findall(r"https://github\.com/[\w.-]+/[\w.-]+", first + setup)
    ) - {REPOSITORY}
    assert not other_urls, f"{path.name} names another repository: {other_urls}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_chapter_opens_with_goals_and_runtime_and_closes_with_summary_and_exercises(
    path,
):
    opening = source(cells(path)[0])
    assert "What you will learn" in opening, (
        f"{path.name} should open with what the reader will learn"
    )
    runtime = re.search(r"\*\*Runtime:\*\*[^\n]*\d+ (s|seconds|min|minutes)\b", opening)
    assert runtime, f"{path.name} should state its measured runtime in the first cell"
    headings = [
        line
        for cell in cells(path)
        if cell["cell_type"] == "markdown"
        for line in source(cell).splitlines()
        if line.startswith("## ")
    ]
    assert headings[-2:] == [
        "## Summary",
        "## Exercises",
    ], f"{path.name} ends with {headings[-2:]}"
    exercises = re.findall(r"^\d+\. ", source(cells(path)[-1]), flags=re.M)
    assert 2 <= len(exercises) <= 4, (
        f"{path.name} has {len(exercises)} exercises; two to four, please"
    )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_no_output_holds_an_error_or_a_local_path(path):
    for index, cell in enumerate(cells(path)):
        for output in cell.get("outputs", []):
            assert output["output_type"] != "error", (
                f"{path.name}, cell {index}: the committed output is an error"
            )
            text = json.dumps(output.get("text", "")) + json.dumps(
                output.get("data", {}).get("text/plain", "")
            )
            assert "/work/" not in text and "/home/" not in text, (
                f"{path.name}, cell {index} prints a local path"
            )


def test_every_link_to_the_repository_names_the_one_in_config():
    """The repository's URL lives in _config.yml; the notebooks, the landing page and
    the README must agree."""
    owner_and_name = REPOSITORY.removeprefix("https://github.com/")
    pattern = re.compile(
        r"(?:github\.com|colab\.research\.google\.com/github)/([\w.-]+/[\w.-]+?)(?=[/\s)\]\"']|\.git|$)"
    )
    files = [*NOTEBOOKS, ROOT / "book" / "intro.md", ROOT / "README.md"]
    found = {
        path.name: set(pattern.findall(path.read_text(encoding="utf8")))
        for path in files
    }
    assert found[NOTEBOOKS[0].name], "the pattern should find the Colab links"
    wrong = {
        name: names - {owner_and_name}
        for name, names in found.items()
        if names - {owner_and_name}
    }
    assert not wrong, (
        f"links to a repository other than {REPOSITORY} (from _config.yml): {wrong}"
    )
