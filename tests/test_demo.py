"""`flickd demo`, the README's one-command main job, end to end on the embedded default: what it
prints, the explore commands it ends with (run as a user pastes them) and the report a person
reads. One demo run serves every test here."""

from __future__ import annotations

import html
import re
import shlex
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from flickd.core.settings import Settings
from models.colour import COLOUR_FAMILIES
from synthetic.catalog import Catalog
from synthetic.procs import free_port, spawn
from tests.conftest import run_flickd, settings_env


@dataclass
class DemoRun:
    out: Path
    stdout: str
    env: dict[str, str]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> DemoRun:
    out = tmp_path_factory.mktemp("demo") / "demo"
    env = settings_env(Settings())
    # Few epochs: this checks the demo's machinery and report, not the recall target (that is
    # tests/test_finetune.py's, with the demo's training configuration).
    args = ["--out", str(out), "--products", "40", "--epochs", "8"]
    done = run_flickd("demo", *args, env=env, timeout=600)
    return DemoRun(out, done.stdout, env)


def test_demo_command_runs_everything_and_writes_a_report(demo_run: DemoRun):
    out = demo_run
    assert "fine-tuned CLIP" in out.stdout
    # The held-out recall it prints is of shoppers' queries, beside the number before.
    assert re.search(
        r"held-out text->image recall@5 \d\.\d{3} -> \d\.\d{3} \(target 0\.9; \d+ queries "
        r"'a/an \{colour family\} \{garment\}'",
        out.stdout,
    ), out.stdout
    text_lines = [
        line
        for line in out.stdout.splitlines()
        if re.match(r"\s+(RIGHT|WRONG) \d/\d right \(\d+ in the catalog\) ", line)
    ]
    assert len(text_lines) >= 1, out.stdout
    for line in text_lines:  # the top hit's colour family and garment, as flickd analysed it
        assert re.search(r": p\d{6} [a-z]+ [a-z]+, -?\d\.\d{3} (exact|similar|weak)$", line), line
    image_lines = [line for line in out.stdout.splitlines() if "'image of " in line]
    assert len(image_lines) == 3
    for line in image_lines:  # a catalog image finds its own product, as an exact match
        expected = line.split("'image of ")[1].split("'")[0]
        assert f": {expected} " in line and line.endswith("exact"), line
        assert line.lstrip().startswith("RIGHT "), line
    report = (out.out / "report.html").read_text()
    assert "Fine-tuning" in report and report.count("<figure>") >= 20
    # The summary lines are rounded too.
    assert not re.search(r"\d\.\d{4,}", out.stdout), out.stdout


# --- the explore commands ------------------------------------------------------------------------
def _explore(stdout: str) -> tuple[dict[str, str], list[list[str]]]:
    """The printed ``export`` line as variables, and the commands after it, as a shell reads
    them; they are the demo's last lines."""
    lines = stdout.rstrip("\n").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("export "))
    words = shlex.split(lines[start])
    exports = dict(word.split("=", 1) for word in words[1:])
    commands = [shlex.split(line) for line in lines[start + 1 :]]
    # `.../bin/flickd search ...`, or `.../python -m flickd.cli search ...` without the script
    subcommands = [argv[3] if argv[1] == "-m" else argv[1] for argv in commands]
    assert subcommands == ["search", "show", "api"], lines[start:]
    return exports, commands


def test_explore_commands_work_when_pasted(demo_run: DemoRun, tmp_path: Path):
    exports, (search, show, api) = _explore(demo_run.stdout)
    assert set(exports) >= {"FLICKD_DATA_DIR", "FLICKD_EMBEDDING_MODEL", "FLICKD_DETECTOR_MODEL"}
    assert exports["FLICKD_DATA_DIR"] == str(demo_run.out / "data")
    assert Path(exports["FLICKD_EMBEDDING_MODEL"]).is_absolute()
    assert Path(exports["FLICKD_EMBEDDING_MODEL"]).is_dir()
    assert exports["FLICKD_DETECTOR_MODEL"] == "none"
    assert Path(search[0]).is_absolute() and Path(search[0]).exists()
    env = {**demo_run.env, **exports}

    def run(argv: list[str]) -> subprocess.CompletedProcess[str]:
        # From another directory than the demo's: the printed paths are absolute.
        done = subprocess.run(
            argv, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return done

    found = run(search).stdout
    assert re.search(r"^\s+1\.\s+-?\d\.\d{3} (exact|similar|weak)\s+p\d{6}\b", found, re.M), found
    product = show[-1]
    shown = run(show).stdout
    assert shown.startswith(f"{product}: "), shown
    assert re.search(r"^  image \d+ analyzed ", shown, re.M), shown

    assert "http://127.0.0.1:8000/" in demo_run.stdout  # the web page, at the printed port
    port = free_port()
    api[api.index("--port") + 1] = str(port)
    url = f"http://127.0.0.1:{port}"
    with spawn(api, Settings(), tmp_path / "api.log", ready=None, extra_env=exports) as proc:
        health = _wait_healthy(url, proc, tmp_path / "api.log")
        assert health["index"]["loaded"] and health["index"]["vectors"] > 0, health
        page = httpx.get(f"{url}/", timeout=10)
        assert page.status_code == 200 and "<html" in page.text.lower()


def _wait_healthy(
    url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 90
) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"flickd api exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            response = httpx.get(f"{url}/health", timeout=2)
            if response.status_code == 200:
                body: dict[str, object] = response.json()
                return body
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"flickd api not healthy after {timeout}s:\n{log.read_text()[-3000:]}")


# --- the report ----------------------------------------------------------------------------------
_FIGURE = re.compile(r"<figure>(.*?)</figure>", re.S)
_CAPTION = re.compile(
    r'<figcaption data-product="([^"]+)" data-score="([^"]+)" data-match="(\w+)" '
    r'data-mark="(right|wrong)">'
)


def test_report_shows_the_searches_first_judged_by_the_catalog(demo_run: DemoRun):
    report = (demo_run.out / "report.html").read_text()
    catalog = Catalog.load(demo_run.out / "catalog")
    truth = {p.product_id: (p.category, p.colour_family) for p in catalog.products}
    nouns = {"trousers": "pants", "shoe": "shoes"}  # the prompts' word for the category

    # What a person sees first: the disclaimer, the gallery, then the chart, then the tables.
    disclaimer = report.find("offline models with random weights")
    gallery = report.find("<div class=gallery>")
    chart = report.find("<img class=chart")
    numbers = report.find("<h2>Numbers</h2>")
    assert -1 < disclaimer < gallery < chart < report.find("<table") < numbers, (
        disclaimer,
        gallery,
        chart,
        numbers,
    )
    assert "recall@1" in report and "recall@10" in report
    assert re.search(r"different products can score\s+1\.000", report)  # why WRONG at 1.000

    figures = _FIGURE.findall(report)
    assert len(figures) >= 20
    # Every hit's picture and every query image is in the page itself.
    assert report.count('<img src="data:image/jpeg;base64,') >= len(figures) + 3
    for figure in figures:  # every hit carries one mark, and says it in words
        # ... and shows what flickd made of it: its colour family and garment
        seen = re.search(r"<br><b>(\w+) [a-z]+</b>", figure)
        assert seen and seen.group(1) in COLOUR_FAMILIES, figure[-600:]
        mark = _caption(figure)[3]
        assert ("RIGHT" in figure) == (mark == "right") and ("WRONG" in figure) != (
            mark == "right"
        ), figure[-600:]

    # No JSON dumps and no long floats anywhere in the page.
    assert '{"' not in report and "{&quot;" not in report and "&quot;:" not in report
    assert not re.search(r"\d\.\d{4,}", report), re.search(r".{40}\d\.\d{4,}.{20}", report)

    exact = Settings().match_exact
    sections = re.findall(r"<section class=search ([^>]*)>(.*?)</section>", report, re.S)
    kinds = [_group(r'data-kind="(\w+)"', attrs) for attrs, _ in sections]
    assert kinds.count("image") == 3 and kinds.count("text") >= 1, kinds
    cross_product_exact = 0
    for kind, (attrs, body) in zip(kinds, sections, strict=True):
        hits = [_caption(figure) for figure in _FIGURE.findall(body)]
        assert hits, body[:300]
        if kind == "image":
            expected = _group(r'data-expected="([^"]+)"', attrs)
            for product, score, match, mark in hits:
                assert mark == ("right" if product == expected else "wrong"), (product, expected)
                if product != expected and float(score) >= exact:
                    cross_product_exact += 1
                    assert match == "exact" and mark == "wrong"  # the badge stays, marked WRONG
        else:
            query = html.unescape(_group(r"&ldquo;(.*?)&rdquo;", body)).lower()
            for product, _score, _match, mark in hits:
                category, family = truth[product]
                noun = nouns.get(category, category)
                wanted = re.search(rf"\b{noun}\b", query) and re.search(rf"\b{family}\b", query)
                assert mark == ("right" if wanted else "wrong"), (query, product, truth[product])
    # A random-weight image encoder scores different products near 1: the case this guards.
    print(f"{cross_product_exact} hits between different products scored >= {exact}")


def _caption(figure: str) -> tuple[str, ...]:
    """A hit's product id, score, match badge and mark."""
    caption = _CAPTION.search(figure)
    assert caption, figure[-600:]
    return caption.groups()


def _group(pattern: str, text: str) -> str:
    found = re.search(pattern, text, re.S)
    assert found, (pattern, text[:300])
    return found.group(1)
