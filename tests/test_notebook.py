"""notebooks/gamestream.ipynb executes on freshly generated data: no cell fails, every chart is drawn and not
empty, its DAU is what `gamestream sql` answers, and the HTML rendered from it (and the committed
docs/notebook.html) holds what the notebook holds."""

from __future__ import annotations

import base64
import importlib.util
import json
import re
import shutil
from pathlib import Path

import pytest

from conftest import gamestream

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "artifacts"
_spec = importlib.util.spec_from_file_location("render_notebook", REPO / "scripts" / "render_notebook.py")
render = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(render)

DAU_LINE = re.compile(r"DAU today \((?P<day>\d{4}-\d{2}-\d{2})\): (?P<dau>\d+)")
DAU_QUERY = ("select count (distinct eventParams.device_id) as DAU from mobile_events_delta_raw "
             "where to_date(eventTime) = current_date;")
MIN_PNG_BYTES = 5_000  # an axes frame with a title alone is smaller than a chart with bars or lines


def _tagged(node, tag: str) -> list:
    return [cell for cell in node.cells if tag in cell.metadata.get("tags", [])]


def _text(cell) -> str:
    return "".join(output.get("text", "") for output in cell.outputs if output.output_type == "stream")


@pytest.fixture(scope="module")
def executed(tmp_path_factory: pytest.TempPathFactory):
    """The notebook executed over three days of events ending now (small batches: files for OPTIMIZE), and the
    data directory."""
    data_dir = tmp_path_factory.mktemp("notebook") / "data"
    render.generate_data(data_dir, days=3, users=300, events=20_000, batch_events=2_000)
    return render.execute(data_dir, cell_timeout=120), data_dir


@pytest.mark.slow
def test_notebook_executes_and_every_chart_is_drawn(executed) -> None:
    node, _ = executed
    assert not [output for cell in node.cells if cell.cell_type == "code" for output in cell.outputs
                if output.output_type == "error"]
    charts = _tagged(node, "chart")
    assert len(charts) >= 6  # events, bookings, activity, retention, money, top events
    for cell in charts:
        pngs = [base64.b64decode(output.data["image/png"]) for output in cell.outputs
                if "image/png" in output.get("data", {})]
        assert len(pngs) == 1, (cell.id, [output.output_type for output in cell.outputs])
        assert pngs[0].startswith(b"\x89PNG") and len(pngs[0]) > MIN_PNG_BYTES, (cell.id, len(pngs[0]))
    optimize, vacuum = (_text(cell) for cell in _tagged(node, "maintenance"))
    compacted = re.search(r"(\d+) files removed and (\d+) added", optimize)
    assert compacted and int(compacted[1]) > int(compacted[2]) > 0, optimize
    assert "RETAIN 12 HOURS refused" in vacuum and "file(s) deleted" in vacuum, vacuum


@pytest.mark.slow
def test_notebook_dau_is_what_gamestream_sql_answers(executed) -> None:
    node, data_dir = executed
    (cell,) = _tagged(node, "dau")
    printed = DAU_LINE.search(_text(cell))
    assert printed, _text(cell)
    answered = json.loads(gamestream("sql", DAU_QUERY, "--format", "json", data_dir=data_dir).stdout)
    assert answered == [{"DAU": int(printed["dau"])}]
    assert int(printed["dau"]) > 0  # the data ends now: today has players


@pytest.mark.slow
def test_rendered_html_holds_the_charts_and_the_cells(executed, tmp_path: Path) -> None:
    node, _ = executed
    html = render.to_html(node)
    path = tmp_path / "notebook.html"
    path.write_text(html)
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copy(path, ARTIFACTS / "notebook.html")  # to look at after a CI run
    images = re.findall(r'<img[^>]+src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(images) >= len(_tagged(node, "chart"))
    assert all(len(base64.b64decode(image)) > MIN_PNG_BYTES for image in images)
    assert _code_sources(html) == [cell.source.strip() for cell in node.cells if cell.cell_type == "code"]


def _code_sources(html: str) -> list[str]:
    """The code cells' sources as the HTML shows them (highlighted, so read back as text)."""
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(html, "html.parser")
    return [editor.get_text().strip() for editor in soup.select(".jp-CodeCell .jp-InputArea-editor")]


def test_committed_html_is_rendered_from_this_notebook() -> None:
    """Editing the notebook without running scripts/render_notebook.py fails here."""
    import nbformat

    node = nbformat.read(render.NOTEBOOK, as_version=4)
    assert all(not cell.get("outputs") and cell.get("execution_count") is None
               for cell in node.cells if cell.cell_type == "code"), \
        "commit the notebook with its outputs cleared (CI executes it)"
    html = render.HTML.read_text()
    stamp = re.search(rf'<meta name="{render.DIGEST_META}" content="([^"]+)">', html)
    rerender = "docs/notebook.html is stale: run .venv/bin/python scripts/render_notebook.py"
    assert stamp and stamp[1] == render.sources_digest(node), rerender
    assert _code_sources(html) == [cell.source.strip() for cell in node.cells if cell.cell_type == "code"], rerender
    assert html.count("data:image/png;base64,") >= len(_tagged(node, "chart")), rerender
