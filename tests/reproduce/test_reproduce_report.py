"""``mmfactory reproduce`` and ``mmfactory report`` through the real CLI on a shrunk MAC run: the claims
table, progress lines, resuming, and a report that renders in a real headless Chromium."""

import base64
import io
import json
import re
import shutil
import subprocess

import pytest
from PIL import Image

from mmfactory.cli import main
from tests.test_recipe_mac import OVERRIDES

IMAGE_STAGE = [
    "model.vision={image_size: 32, patch_size: 8, hidden_size: 32, num_layers: 1, num_heads: 2, "
    "num_frames: 1}",
    "data.train=[{format: world, kind: scenes, size: 32, image_size: 32}]",
    "data.eval=[{format: world, kind: scenes, split: val, size: 8, image_size: 32}]",
    "train.max_steps=6",
]
# mac/tiny's CLI test shrink with every stage on: each check of the claims row has its metrics
SHRUNK_MAC = [
    *(o for o in OVERRIDES if not o.endswith(".enabled=false")),
    *(
        f"stages.masked_long.{o.removeprefix('stages.masked.')}"
        for o in OVERRIDES
        if o.startswith("stages.masked.")
    ),
    *(
        f"stages.{stage}.{o}"
        for stage in ("image_masked", "image_unmasked", "image_masked_long")
        for o in IMAGE_STAGE
    ),
]
CHROMIUMS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory):
    out = tmp_path_factory.mktemp("reproduce") / "quick"
    args = ["reproduce", "--only", "MAC", "--output", str(out), *SHRUNK_MAC]
    return out, args


def test_reproduce_writes_the_claims_table_and_resumes(reproduced, capsys):
    out, args = reproduced
    assert main(args) == 0
    printed = capsys.readouterr().out
    progress = [line for line in printed.splitlines() if line.startswith("[reproduce 1/1 mac/tiny seed 0]")]
    assert any("stage 1/7 image_tower" in line for line in progress)
    assert any("stage 2/7 masked" in line for line in progress)
    assert any("stage 7/7 image_masked_long" in line for line in progress)
    assert all(re.search(r"elapsed \S+ · about \S+ left$", line) for line in progress)
    assert "pipeline check" in printed

    rows = {r["method"]: r for r in json.loads((out / "claims.json").read_text())}
    assert list(rows) == ["MAC"]  # only the methods asked for
    mac = rows["MAC"]
    assert mac["verdict"] in ("yes", "partly", "no")
    flops = next(c for c in mac["checks"] if "FLOPs" in c["label"])
    assert flops["state"] == "holds" and flops["per_seed"][0] > 2.5  # masking 75 % of the patches
    metrics = json.loads((out / "mac-tiny" / "seed-0" / "results.json").read_text())["metrics"]
    assert flops["per_seed"][0] == pytest.approx(
        metrics["unmasked/step_gflops"] / metrics["masked/step_gflops"]
    )
    table = (out / "claims.md").read_text()
    assert "| MAC |" in table and "pipeline check" in table
    summary = json.loads((out / "reproduce.json").read_text())
    assert summary["profile"] == "quick" and summary["seeds"] == [0]
    assert summary["runs"]["mac/tiny/seed-0"]["state"] == "done"

    assert main(args) == 0  # again: every stage is found done, the same table comes out
    assert printed.count("already done") == 0 and capsys.readouterr().out.count("already done") == 7
    assert {r["method"]: r["checks"] for r in json.loads((out / "claims.json").read_text())}["MAC"] == mac[
        "checks"
    ]


def test_reproduce_refuses_bad_arguments_before_training(tmp_path, capsys):
    assert main(["reproduce", "--only", "NoSuchMethod", "--output", str(tmp_path / "x")]) == 2
    assert "unknown method" in capsys.readouterr().err
    assert main(["reproduce", "--only", "MAC", "--seeds", "0", "--output", str(tmp_path / "x")]) == 2
    assert main(["reproduce", "--only", "MAC", "--output", str(tmp_path / "x"), "train.max_step=3"]) == 2
    assert "did you mean 'max_steps'" in capsys.readouterr().err
    assert not (tmp_path / "x" / "mac-tiny").exists()


def _report(reproduced, capsys):
    out, args = reproduced
    if not (out / "claims.json").is_file():
        assert main(args) == 0
    assert main(["report", str(out)]) == 0
    assert str(out / "report.html") in capsys.readouterr().out
    return out / "report.html"


def test_report_is_self_contained_with_every_section(reproduced, capsys):
    page = _report(reproduced, capsys).read_text()
    for anchor in ("claims", "run-0", "run-0-curves", "run-0-comparison", "run-0-examples", "environment"):
        assert f'id="{anchor}"' in page
    assert "Text-to-video retrieval" in page and "masked" in page
    assert not re.search(r"""(?:src|href)\s*=\s*(?!["']?(?:data:|#))""", page), (
        "a link to another file or URL"
    )
    assert "url(" not in page and "@import" not in page and "http" not in page
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) >= 1 + 3 * 6  # the curves and 6 retrievals of 3 thumbnails
    for data in images:
        Image.open(io.BytesIO(base64.b64decode(data))).verify()


def test_report_renders_in_headless_chromium(reproduced, capsys, tmp_path):
    browser = next((shutil.which(name) for name in CHROMIUMS if shutil.which(name)), None)
    if browser is None:
        pytest.skip(f"no headless Chromium on PATH (looked for {', '.join(CHROMIUMS)}); install `chromium`")
    page = _report(reproduced, capsys)
    # A copy that records, once loaded, which sections the browser built and how many images failed.
    probe = tmp_path / "probe.html"
    script = (
        "<script>window.addEventListener('load', () => { const b = document.body;"
        " b.dataset.broken = [...document.images].filter(i => !i.complete || i.naturalWidth === 0).length;"
        " b.dataset.images = document.images.length;"
        " b.dataset.sections = [...document.querySelectorAll('[id]')].map(e => e.id).join(' '); });</script>"
    )
    probe.write_text(page.read_text().replace("</body>", script + "</body>"))
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
    flags += ["--virtual-time-budget=5000", "--no-first-run", "--disable-extensions"]
    dom = subprocess.run(
        [*flags, "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    found = re.search(r'data-broken="(\d+)" data-images="(\d+)" data-sections="([^"]*)"', dom)
    assert found, "the page's load handler did not run"
    broken, count, sections = int(found[1]), int(found[2]), found[3].split()
    assert broken == 0 and count >= 19
    assert {"claims", "run-0-curves", "run-0-comparison", "run-0-examples", "environment"} <= set(sections)

    shot = tmp_path / "shot.png"
    subprocess.run(
        [*flags, f"--screenshot={shot}", "--window-size=1200,1600", page.as_uri()],
        capture_output=True,
        timeout=120,
        check=True,
    )
    image = Image.open(shot).convert("L")
    assert image.size == (1200, 1600)
    histogram = image.histogram()
    assert max(histogram) < 0.97 * sum(histogram), "the screenshot is (almost) one colour: blank"
    assert sum(1 for n in histogram if n) > 20
