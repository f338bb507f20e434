"""The held-out page: one self-contained HTML file of scored examples to look at (`evaluate_vlm.py --html`).

Notable:
- Self-contained: images are inlined as data URIs (thumbnails at most `THUMBNAIL` px a side: PNG for small images,
  whose pixels matter, JPEG for photos), styles are inline, and there is no script, so the page opens from disk
  and asks nothing of the network.
- The scores at the top are the summary that `summary.json` holds, blind baselines beside the model's.
- A card per example: the image(s), the question, the model's answer, the reference and every blind baseline's
  answer. Wrong ones first. "Right" is the primary metric at full marks: the first `--scorer` if there is one
  (the quickstart's `caption_correct` for captions), else exact match.
- Nothing names a path of this machine: the title holds display names (`hub.display_name`) given by the caller,
  and predictions hold no paths.
- A large set shows the first `limit` cards in that order, and says how many it shows.
"""

import base64
import html
import io
from pathlib import Path

from PIL import Image

THUMBNAIL = 192  # pixels, the longer side of an inlined image
PIXEL_ART = 64  # images this small are shown enlarged without smoothing, and inlined losslessly
STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: .5em 0 1em; } td, th { border: 1px solid #ccc; padding: .2em .6em; }
td { text-align: right; } .grid { display: flex; flex-wrap: wrap; gap: .8em; }
figure { margin: 0; width: 220px; border: 2px solid #8c8; border-radius: 6px; padding: .5em; }
figure.wrong { border-color: #d66; } figure img { width: 128px; height: auto; display: inline-block; }
img.pixels { image-rendering: pixelated; } figcaption div { overflow-wrap: anywhere; }
.label { color: #777; } .miss { color: #b33; } .hit { color: #383; }
"""


def is_right(value) -> bool:
    """A metric at full marks: True, or a number of at least 1."""
    return value is not None and float(value) >= 1.0


def inline_image(image: Image.Image) -> str:
    """An <img> holding a thumbnail of `image` as a data URI."""
    small = max(image.size) <= PIXEL_ART
    thumb = image.convert("RGB")
    thumb.thumbnail((THUMBNAIL, THUMBNAIL))  # never enlarges; the browser does, for pixel art
    buffer = io.BytesIO()
    thumb.save(buffer, "PNG" if small else "JPEG", quality=85)
    uri = f"data:image/{'png' if small else 'jpeg'};base64," + base64.b64encode(buffer.getvalue()).decode()
    return f'<img src="{uri}" alt="held-out image"' + (' class="pixels">' if small else ">")


def line(label: str, text: str, right: bool | None = None) -> str:
    mark = "" if right is None else (' class="hit">✓ ' if right else ' class="miss">✗ ')
    return f'<div><span class="label">{label}:</span> <span{mark or ">"}{html.escape(text)}</span></div>'


def card(prediction: dict, images: list[Image.Image], primary: str) -> str:
    right = is_right(prediction[primary])
    rows = [line("question", prediction["question"]), line("answer", prediction["prediction"], right)]
    rows.append(line("reference", prediction["reference"]))
    for name, blind in prediction["blind"].items():
        rows.append(line(f"blind ({name})", blind["prediction"], is_right(blind[primary])))
    pictures = "".join(inline_image(image) for image in images)
    return (
        f'<figure class="{"right" if right else "wrong"}">{pictures}<figcaption>{"".join(rows)}</figcaption></figure>'
    )


def scores_table(summary: dict, primary: str) -> str:
    """Rows: the model's metrics; columns: the model, then each blind baseline (— where it could not run)."""
    blinds = summary["blind"]
    head = "<tr><th>metric</th><th>model</th>" + "".join(f"<th>blind ({html.escape(n)})</th>" for n in blinds)
    rows = []
    for key in dict.fromkeys([primary, "exact_match", "cider"]):
        cells = [summary[key], *((b or {}).get(key) for b in blinds.values())]
        shown = ("—" if v is None else f"{v:.1%}" if key != "cider" else f"{v:.3f}" for v in cells)
        rows.append(f"<tr><th>{html.escape(key)}</th>" + "".join(f"<td>{v}</td>" for v in shown) + "</tr>")
    return f"<table>{head}</tr>{''.join(rows)}</table>"


def write_page(path: Path, result: dict, title: str, primary: str = "exact_match", limit: int = 500) -> Path:
    """Write the page for `evaluation.evaluate`'s result; `primary` decides right and wrong; returns `path`."""
    summary, predictions = result["summary"], result["predictions"]
    order = sorted(range(len(predictions)), key=lambda i: is_right(predictions[i][primary]))  # stable: wrong first
    shown = order[:limit]
    right = sum(is_right(p[primary]) for p in predictions)
    skipped = ", ".join(f"{reason} {k}" for reason, k in summary["skipped"].items()) or "none"
    counts = (
        f'<p id="counts" data-examples="{len(predictions)}" data-right="{right}" data-shown="{len(shown)}">'
        f"{len(predictions)} examples scored: {right} right and {len(predictions) - right} wrong by "
        f"<b>{html.escape(primary)}</b>; skipped: {html.escape(skipped)}. Showing {len(shown)}, wrong ones first.</p>"
    )
    cards = "".join(card(predictions[i], result["images"][i], primary) for i in shown)
    page = (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>{scores_table(summary, primary)}"
        f'{counts}<div class="grid">{cards}</div></body></html>'
    )
    path = Path(path)
    path.write_text(page, encoding="utf-8")
    return path
