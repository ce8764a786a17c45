"""The book's website, built and checked in a real browser (headless Chromium driven by
Playwright).

The module builds the site exactly as a reader would (``jupyter-book build book -W -n
--keep-going --all`` into
``_build/html``; --all, because an incremental build re-reads only changed pages and so
would not repeat the
warnings of the others), serves ``_build/html`` on a localhost port and opens every page
of the table of contents in
Debian's Chromium. It checks that each page loads without console errors or failed local
requests, asks nothing
from the internet but the "Open in Colab" badge, shows every image (the glued figures
and the GIF animation
included), typesets every formula with the bundled MathJax, and that the table of
contents, the next/previous links
and the search page work. A full-page screenshot of each page is saved in
``artifacts/screenshots/``.

Without a browser (no Chromium, or Playwright not importable) the browser tests are
skipped, saying why; the
warning-free build is checked either way.
"""

import base64
import functools
import html
import http.server
import io
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from urllib.parse import urldefrag, urljoin

import pytest
import torch
import yaml

import vae_helpers as vh

pytestmark = pytest.mark.slow  # builds the site and drives a browser: about a minute

ROOT = Path(__file__).resolve().parent.parent
BOOK = ROOT / "book"
HTML = ROOT / "_build" / "html"
SCREENSHOTS = ROOT / "artifacts" / "screenshots"

CHROMIUM = Path(
    "/usr/bin/chromium"
)  # Debian's package `chromium`; CHROMIUM=/path/to/chrome overrides
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]

REPOSITORY = yaml.safe_load((ROOT / "_config.yml").read_text(encoding="utf8"))[
    "repository"
]["url"]
COLAB_BADGE = "https://colab.research.google.com/assets/colab-badge.svg"
ALLOWED_EXTERNAL = {
    COLAB_BADGE
}  # the only thing a page may fetch from outside the site (offline: it fails)

# a word that appears in chapter 2 (Jensen's inequality) and on no other page
SEARCH_WORD = "Jensen"
SEARCH_PAGE = "notebooks/02_elbo"

EXPLORER = "notebooks/08_latent_explorer"
EXPLORER_WEIGHTS = BOOK / "_extra" / "latent_explorer" / "weights.js"

BUILD_TIMEOUT_S = 900
PAGE_TIMEOUT_MS = 30_000


def toc_pages():
    """The pages of book/_toc.yml in reading order: the root, then the chapters."""
    toc = yaml.safe_load((BOOK / "_toc.yml").read_text(encoding="utf8"))
    assert toc["format"] == "jb-book", toc
    return [toc["root"]] + [entry["file"] for entry in toc["chapters"]]


PAGES = toc_pages()


def source_of(page):
    for suffix in (".md", ".ipynb"):
        if (BOOK / (page + suffix)).is_file():
            return BOOK / (page + suffix)
    raise AssertionError(
        f"{page} is in book/_toc.yml but neither {page}.md nor {page}.ipynb exists in"
        " book/"
    )


def source_has_math(page):
    """Whether the page's Markdown (for a notebook: its Markdown cells) contains $...$,
    $$...$$ or \\begin{...}."""
    path = source_of(page)
    if path.suffix == ".ipynb":
        cells = json.loads(path.read_text(encoding="utf8"))["cells"]
        text = "\n".join(
            "".join(cell["source"]) for cell in cells if cell["cell_type"] == "markdown"
        )
    else:
        text = path.read_text(encoding="utf8")
    text = re.sub(r"```.*?```", "", text, flags=re.S)  # code blocks are not math
    return bool(re.search(r"\$\$|\$[^$\n]+\$|\\begin\{", text))


def page_text(page):
    """The visible text of a built page's article (prose, code and outputs), for the
    search checks."""
    content = (HTML / (page + ".html")).read_text(encoding="utf8")
    match = re.search(r"<article[^>]*>(.*)</article>", content, flags=re.S)
    article = match.group(1) if match else content
    article = re.sub(r"<(script|style)\b.*?</\1>", " ", article, flags=re.S)
    article = re.sub(r"<img\b[^>]*>", " ", article)  # base64 images are not text
    return html.unescape(re.sub(r"<[^>]+>", " ", article))


def url_of(base, page):
    return f"{base}{page}.html"


def without_fragment(url):
    return urldefrag(url)[0]


# --------------------------------------------------------------------------------------
# Fixtures: the build, the local server, the browser
# --------------------------------------------------------------------------------------


def jupyter_book_command():
    executable = Path(sys.executable).with_name("jupyter-book")
    if executable.exists():
        return [str(executable)]
    found = shutil.which("jupyter-book")
    if found:
        return [found]
    pytest.fail("jupyter-book is not installed (pip install -r requirements.txt)")


@pytest.fixture(scope="module")
def explorer_weights():
    """Export the latent explorer's weights before the build, as chapter 8 does, with
    the same function and configs: the build publishes them, and CI runs tests/ before
    notebooks/ on an empty outputs/. The models are loaded from the checkpoints of
    chapters 4 and 6, or trained once into outputs/, where those chapters then find
    them (same configs, same output_dir): nothing is trained twice."""
    seconds = time.monotonic()
    size = vh.export_explorer_weights(
        vh.load_config(ROOT / "config.yaml"),
        vh.load_config(ROOT / "configs" / "latent_2d.yaml"),
        EXPLORER_WEIGHTS,
    )
    print(
        f"explorer weights: {size / 1000:,.0f} kB in {time.monotonic() - seconds:.1f} s"
    )
    return EXPLORER_WEIGHTS


@pytest.fixture(scope="module")
def build(explorer_weights):
    """Build the site once for this module; return (exit status, seconds, output, the
    lines that are warnings)."""
    command = jupyter_book_command() + [
        "build",
        "book",
        "-W",
        "-n",
        "--keep-going",
        "--all",
    ]
    start = time.monotonic()
    result = subprocess.run(
        command,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT_S,
        env={**os.environ, "NO_COLOR": "1"},
    )
    seconds = time.monotonic() - start
    output = re.sub(r"\x1b\[[0-9;]*m", "", result.stdout + result.stderr)
    warnings = [
        line
        for line in output.splitlines()
        if re.search(r"\b(WARNING|ERROR|CRITICAL|SEVERE)\b|Traceback", line)
    ]
    return result.returncode, seconds, output, warnings


@pytest.fixture(scope="module")
def site(build):
    """Serve _build/html on a free localhost port; yield its base URL."""
    if not (HTML / "index.html").is_file():
        pytest.fail(f"the build wrote no {HTML / 'index.html'}:\n{build[2][-5000:]}")

    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(QuietHandler, directory=HTML)
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/"
    server.shutdown()
    server.server_close()


def find_chromium():
    candidates = [
        os.environ.get("CHROMIUM"),
        str(CHROMIUM),
        shutil.which("chromium"),
        shutil.which("chromium-browser"),
    ]
    for candidate in candidates:
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as error:
        pytest.skip(
            f"no browser test: Playwright for Python is not importable ({error}); pip"
            " install playwright"
        )
    executable = find_chromium()
    if executable is None:
        pytest.skip(
            f"no browser test: no Chromium at {CHROMIUM} nor on PATH (Debian/Ubuntu:"
            " apt-get install chromium)"
        )
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=executable, args=CHROMIUM_ARGS, headless=True
        )
        yield chromium
        chromium.close()


class Tab:
    """A browser page whose console errors, failed local requests and external requests
    are recorded."""

    def __init__(self, context, base):
        self.base = base
        self.page = context.new_page()
        self.page.set_default_timeout(PAGE_TIMEOUT_MS)
        self.console_errors, self.failed_requests, self.external_requests = [], [], []
        self.page.on("console", self._on_console)
        self.page.on(
            "pageerror",
            lambda error: self.console_errors.append(f"uncaught exception: {error}"),
        )
        self.page.on("requestfailed", self._on_request_failed)
        self.page.on("response", self._on_response)
        self.page.route("**/*", self._route)

    def is_local(self, url):
        return url.startswith(self.base) or url.startswith("data:")

    def _route(self, route):
        url = route.request.url
        if self.is_local(url):
            route.continue_()
        else:  # nothing leaves the machine: the site must work offline
            self.external_requests.append(f"{route.request.resource_type} {url}")
            route.abort()

    def _on_console(self, message):
        if message.type != "error":
            return
        source = message.location.get("url", "") if message.location else ""
        if message.text.startswith("Failed to load resource") and not self.is_local(
            source
        ):
            # an external request we aborted; recorded, and judged, in external_requests
            return
        self.console_errors.append(f"{message.text} (at {source})")

    def _on_request_failed(self, request):
        if self.is_local(request.url):
            self.failed_requests.append(f"{request.url}: {request.failure}")

    def _on_response(self, response):
        if self.is_local(response.url) and response.status >= 400:
            self.failed_requests.append(f"{response.url}: HTTP {response.status}")

    def goto(self, url):
        self.page.goto(url, wait_until="load")
        self.settle()

    def settle(self):
        """Wait until every image has loaded (or failed), MathJax has typeset the page
        and fonts are ready."""
        self.page.evaluate(
            "() => document.querySelectorAll('img[loading=lazy]').forEach(i =>"
            " i.loading = 'eager')"
        )
        self.page.wait_for_function(
            "() => Array.from(document.images).every(image => image.complete)"
        )
        self.page.evaluate("""async () => {
            if (window.MathJax && MathJax.startup && MathJax.startup.promise) { await
            MathJax.startup.promise; }
            await document.fonts.ready;
        }""")

    def problems(self):
        external = [
            request
            for request in self.external_requests
            if request.split(" ", 1)[1] not in ALLOWED_EXTERNAL
        ]
        return (
            [f"console error: {error}" for error in self.console_errors]
            + [f"failed request: {failure}" for failure in self.failed_requests]
            + [f"request to the internet: {request}" for request in external]
        )


@pytest.fixture(scope="module")
def context(browser, site):
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    for old in SCREENSHOTS.glob("*.png"):
        old.unlink()
    context = browser.new_context(
        viewport={"width": 1280, "height": 900}, color_scheme="light"
    )
    yield context
    context.close()


@pytest.fixture
def tab(context, site):
    tab = Tab(context, site)
    yield tab
    tab.page.close()


# --------------------------------------------------------------------------------------
# The build
# --------------------------------------------------------------------------------------


def test_build_is_warning_free(build):
    status, seconds, output, warnings = build
    print(f"jupyter-book build book -W -n --keep-going --all: {seconds:.1f} s")
    assert status == 0 and not warnings, (
        f"the website build exited with {status} and {len(warnings)} warning line(s):\n"
        + "\n".join(warnings)
        + "\n--- end of the output ---\n"
        + output[-3000:]
    )


def test_toc_lists_every_chapter_notebook_once():
    notebooks = sorted(
        f"notebooks/{path.stem}"
        for path in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")
    )
    chapters = [page for page in PAGES if page.startswith("notebooks/")]
    assert chapters == notebooks, (
        f"book/_toc.yml lists {chapters}, notebooks/ holds {notebooks}"
    )
    assert (BOOK / "notebooks").is_symlink(), (
        "book/notebooks must be the symlink to ../notebooks, not a copy"
    )


# --------------------------------------------------------------------------------------
# Every page in the browser
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("page", PAGES)
def test_page_renders(tab, site, page):
    tab.goto(url_of(site, page))
    problems = tab.problems()

    images = tab.page.evaluate("""() => Array.from(document.images).map(image => ({
        src: image.currentSrc || image.src, width: image.naturalWidth, alt:
        image.alt}))""")
    for image in images:
        shown = (
            image["src"]
            if not image["src"].startswith("data:")
            else image["src"][:40] + "..."
        )
        if tab.is_local(image["src"]):
            if image["width"] == 0:
                problems.append(f"image not loaded: {shown} (alt {image['alt']!r})")
        elif image["src"] not in ALLOWED_EXTERNAL:
            problems.append(f"image from the internet: {shown}")

    math = tab.page.evaluate("""() => {
        const formulas = Array.from(document.querySelectorAll('span.math, div.math'));
        return {formulas: formulas.length,
                untypeset: formulas.filter(f => !f.querySelector('mjx-container'))
                                   .map(f => f.textContent.slice(0, 80)),
                containers: document.querySelectorAll('mjx-container').length,
                errors: Array.from(document.querySelectorAll('mjx-merror'))
                             .map(e => e.getAttribute('data-mjx-error') ||
                             e.textContent)};
    }""")
    if source_has_math(page):
        if math["formulas"] == 0:
            problems.append(
                "the source has math but the page has no math elements (is dollarmath"
                " enabled?)"
            )
        if math["containers"] == 0:
            problems.append(
                "MathJax typeset nothing (is _static/mathjax/tex-chtml.js served?)"
            )
    problems += [
        f"formula not typeset by MathJax: {formula!r}" for formula in math["untypeset"]
    ]
    problems += [f"MathJax error: {error}" for error in math["errors"]]

    # A table row separator such as |---:| in a paragraph (its dashes possibly made an
    # en or em dash by smartquotes)
    raw_markdown = tab.page.evaluate("""() =>
    Array.from(document.querySelectorAll('article p'))
        .map(paragraph => paragraph.textContent).filter(text =>
        /\\|\\s*:?(-{3,}|[\u2013\u2014]-*):?\\s*\\|/.test(text))""")
    problems += [
        f"a Markdown table shown as text, not rendered: {text[:80]!r}"
        for text in raw_markdown
    ]

    tab.page.screenshot(
        path=str(SCREENSHOTS / f"{Path(page).name}.png"), full_page=True
    )
    assert not problems, f"{page}.html:\n" + "\n".join(problems)


def test_mathjax_is_served_by_the_site(tab, site):
    tab.goto(url_of(site, SEARCH_PAGE))
    sources = tab.page.evaluate(
        "() => Array.from(document.scripts).map(script => script.src).filter(Boolean)"
    )
    mathjax = [source for source in sources if "mathjax" in source.lower()]
    assert mathjax and all(
        source.startswith(site + "_static/mathjax/") for source in mathjax
    ), mathjax
    assert tab.page.evaluate("() => Boolean(window.MathJax && MathJax.version)"), (
        "MathJax did not start"
    )


def gif_frames(data_url):
    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))).n_frames


@pytest.mark.parametrize("page", [PAGES[0], "notebooks/04_training"])
def test_training_animation_is_shown(tab, site, page):
    tab.goto(url_of(site, page))
    gifs = tab.page.evaluate("""() => Array.from(document.querySelectorAll(
        'article img'))
        .filter(image => image.src.startsWith('data:image/gif'))
        .map(image => ({width: image.naturalWidth, src: image.src}))""")
    assert gifs, f"{page}.html shows no GIF image (the glued 'progress_animation')"
    assert all(gif["width"] > 0 for gif in gifs), f"a GIF on {page}.html did not load"
    assert all(gif_frames(gif["src"]) > 1 for gif in gifs), (
        f"the GIF on {page}.html is not animated"
    )


def test_landing_page_shows_the_glued_figures(tab, site):
    tab.goto(url_of(site, PAGES[0]))
    figures = tab.page.evaluate("""() => Array.from(document.querySelectorAll(
        'article img'))
        .filter(image => new URL(image.src).pathname.includes('/_images/'))
        .map(image => image.naturalWidth)""")
    assert len(figures) >= 3 and all(width > 0 for width in figures), (
        "the landing page should show the reconstructions, generations and t-SNE"
        f" figures glued from chapter 6; it shows {len(figures)} image(s) from _images/"
        f" with widths {figures}"
    )


# --------------------------------------------------------------------------------------
# Navigation
# --------------------------------------------------------------------------------------


def sidebar_links(tab):
    return tab.page.evaluate("""() =>
    Array.from(document.querySelectorAll('nav.bd-docs-nav a.reference.internal'))
        .map(link => ({href: link.href, text: link.textContent.trim()}))""")


def heading(tab):
    return (
        tab.page.locator("article h1")
        .first.inner_text()
        .replace("#", "")
        .replace("¶", "")
        .strip()
    )


def test_table_of_contents_reaches_every_page(tab, site):
    tab.goto(url_of(site, PAGES[0]))
    links = sidebar_links(tab)
    assert [without_fragment(link["href"]) for link in links] == [
        url_of(site, page) for page in PAGES
    ], links

    # Click through the book from the sidebar of the page before, and back to the
    # landing page.
    for page in PAGES[1:] + PAGES[:1]:
        target = url_of(site, page)
        link = next(
            (
                link
                for link in sidebar_links(tab)
                if without_fragment(link["href"]) == target
            ),
            None,
        )
        assert link is not None, (
            f"the sidebar of {tab.page.url} has no link to {target}"
        )
        with tab.page.expect_navigation(wait_until="load"):
            tab.page.locator("nav.bd-docs-nav a.reference.internal").filter(
                has_text=link["text"]
            ).first.click()
        tab.settle()
        assert without_fragment(tab.page.url) == target
        assert heading(tab) == link["text"], (
            f"{target}: title {heading(tab)!r}, sidebar says {link['text']!r}"
        )
    assert not tab.problems(), "\n".join(tab.problems())


def follow(tab, selector):
    """Follow the link `selector` from page to page until there is none; return the URLs
    visited after the start."""
    visited = []
    for _ in range(len(PAGES) + 1):
        link = tab.page.locator(selector)
        if link.count() == 0:
            return visited
        with tab.page.expect_navigation(wait_until="load"):
            link.first.click()
        tab.settle()  # leaving a page while MathJax loads its fonts aborts them
        visited.append(without_fragment(tab.page.url))
    raise AssertionError(f"following {selector} does not end: {visited}")


def test_next_and_previous_links_walk_the_book(tab, site):
    expected = [url_of(site, page) for page in PAGES]
    tab.goto(expected[0])
    assert follow(tab, "a.right-next") == expected[1:], (
        "the 'next' links do not follow the table of contents"
    )
    assert follow(tab, "a.left-prev") == expected[-2::-1], (
        "the 'previous' links do not go back through the book"
    )
    assert not tab.problems(), "\n".join(tab.problems())


def test_local_links_resolve(site):
    """Every link to a page or file of the site, on every page, answers 200; every
    #fragment exists."""
    links = set()
    for page in PAGES:
        content = (HTML / (page + ".html")).read_text(encoding="utf8")
        links.update(
            urljoin(url_of(site, page), html.unescape(href))
            for href in re.findall(r'href="([^"]+)"', content)
        )
    broken = []
    for link in sorted(link for link in links if link.startswith(site)):
        url, fragment = urldefrag(link)
        try:
            with urllib.request.urlopen(url) as response:
                body = (
                    response.read().decode("utf8", "replace")
                    if url.endswith(".html")
                    else ""
                )
        except OSError as error:
            broken.append(f"{link}: {error}")
            continue
        if fragment and url.endswith(".html") and f'id="{fragment}"' not in body:
            broken.append(f"{link}: no element with id {fragment!r}")
    assert not broken, "\n".join(broken)


def test_chapter_launch_buttons_open_the_notebooks(tab, site):
    for page in PAGES:
        if not page.startswith("notebooks/"):
            continue
        tab.goto(url_of(site, page))
        hrefs = tab.page.evaluate(
            "() => Array.from(document.querySelectorAll('a[href]')).map(a => a.href)"
        )
        colab = f"https://colab.research.google.com/github/{REPOSITORY.split('github.com/')[1]}/blob/main/{page}.ipynb"
        binder = f"https://mybinder.org/v2/gh/{REPOSITORY.split('github.com/')[1]}/main?urlpath=lab/tree/{page}.ipynb"
        assert colab in hrefs, (
            f"{page}.html has no link {colab} (the Colab launch button and badge)"
        )
        assert binder in hrefs, f"{page}.html has no Binder launch button {binder}"
        assert not any("/book/notebooks/" in href for href in hrefs), (
            f"{page}.html links into the book/notebooks symlink"
        )


# --------------------------------------------------------------------------------------
# Search
# --------------------------------------------------------------------------------------


def test_search_finds_a_word_of_chapter_2(tab, site):
    word = re.compile(rf"\b{SEARCH_WORD}\b", re.IGNORECASE)
    pages_with_word = [page for page in PAGES if word.search(page_text(page))]
    assert pages_with_word == [SEARCH_PAGE], (
        f"the search check needs a word that only {SEARCH_PAGE} uses; {SEARCH_WORD!r}"
        f" is on {pages_with_word}: choose another SEARCH_WORD in {Path(__file__).name}"
    )

    tab.goto(f"{site}search.html?q={SEARCH_WORD}")
    tab.page.wait_for_function("""() => {
        const status = document.querySelector('#search-results .search-summary');
        return status && /Search finished|did not match/.test(status.textContent);
    }""")
    results = tab.page.evaluate("""() =>
    Array.from(document.querySelectorAll('#search-results ul.search > li'))
        .map(item => item.querySelector('a').href)""")
    tab.page.screenshot(path=str(SCREENSHOTS / "search.png"), full_page=True)
    assert [without_fragment(result).split("?")[0] for result in results] == [
        url_of(site, SEARCH_PAGE)
    ], results

    with tab.page.expect_navigation(wait_until="load"):
        tab.page.locator("#search-results ul.search > li a").first.click()
    tab.settle()
    assert without_fragment(tab.page.url).split("?")[0] == url_of(site, SEARCH_PAGE)
    assert not tab.problems(), "\n".join(tab.problems())


# --------------------------------------------------------------------------------------
# Code and formulas that fit the page
# --------------------------------------------------------------------------------------

WIDE, NARROW = 1280, 400

# Every code box (a cell's source, its printed output, a code block) and every display
# formula in the article that is wider than its box, or than the article's column.
TOO_WIDE = """() => {
    const column = document.querySelector('article').getBoundingClientRect().right;
    const boxes = Array.from(document.querySelectorAll('article pre'))
        .filter(box => box.scrollWidth > box.clientWidth + 1)
        .map(box => `code ${box.scrollWidth} px wide in a ${box.clientWidth} px box: `
                    + JSON.stringify(box.textContent.split('\\n').reduce(
                        (a, line) => line.length > a.length ? line : a, '')));
    const formulas = Array.from(
            document.querySelectorAll('article mjx-container[display="true"]'))
        .filter(f => f.scrollWidth > f.clientWidth + 1
                     || f.getBoundingClientRect().right > column + 1)
        .map(f => `formula ${f.scrollWidth} px wide in a ${f.clientWidth} px column: `
                  + JSON.stringify((f.closest('.math') || f).textContent.slice(0, 60)));
    return boxes.concat(formulas);
}"""


@pytest.mark.parametrize("page", PAGES)
def test_code_and_formulas_fit_at_1280_px(tab, site, page):
    assert tab.page.viewport_size["width"] == WIDE
    tab.goto(url_of(site, page))
    too_wide = tab.page.evaluate(TOO_WIDE)
    assert not too_wide, f"{page}.html at {WIDE} px:\n" + "\n".join(too_wide)


@pytest.fixture(scope="module")
def narrow_context(browser, site):
    context = browser.new_context(
        viewport={"width": NARROW, "height": 800}, color_scheme="light"
    )
    yield context
    context.close()


@pytest.mark.parametrize("page", PAGES)
def test_no_page_is_wider_than_a_400_px_phone(narrow_context, site, page):
    """On a phone, code boxes and formulas scroll inside themselves; the page does
    not."""
    tab = Tab(narrow_context, site)
    try:
        tab.goto(url_of(site, page))
        width = tab.page.evaluate("() => document.documentElement.scrollWidth")
        tab.page.screenshot(
            path=str(SCREENSHOTS / f"{Path(page).name}_{NARROW}px.png"), full_page=True
        )
        assert width <= NARROW, f"{page}.html is {width} px wide at {NARROW} px"
        assert not tab.problems(), "\n".join(tab.problems())
    finally:
        tab.page.close()


# --------------------------------------------------------------------------------------
# The latent explorer (chapter 8): the chapters' models, run in the browser
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def explorer_models(explorer_weights):
    """The 32-D and 2-D models from their checkpoints (which exported the weights)."""
    config = vh.load_config(ROOT / "config.yaml")
    config_2d = vh.load_config(ROOT / "configs" / "latent_2d.yaml")
    return {
        "config": config,
        "latent32": vh.load_or_train(config, progress=False)[0].cpu(),
        "latent2": vh.load_or_train(config_2d, progress=False)[0].cpu(),
    }


def open_explorer(tab, site):
    tab.goto(url_of(site, EXPLORER))
    tab.page.wait_for_function("() => window.latentExplorer !== undefined")


def canvas_greys(tab, selector):
    """The 28 x 28 grey levels a canvas shows: the centre pixel of each block."""
    return tab.page.evaluate(
        """(selector) => {
        const canvas = document.querySelector(selector);
        const scale = canvas.width / 28;
        const data = canvas.getContext('2d').getImageData(
            0, 0, canvas.width, canvas.height).data;
        const greys = [];
        for (let y = 0; y < 28; y++) for (let x = 0; x < 28; x++) {
            const at = 4 * (Math.floor((y + 0.5) * scale) * canvas.width
                            + Math.floor((x + 0.5) * scale));
            greys.push(data[at]);
        }
        return greys;
    }""",
        selector,
    )


def pytorch_greys(model, z, config):
    """PyTorch's decoder output for the code z as 8-bit grey levels (784 values)."""
    with torch.no_grad():
        x = model.decode(torch.tensor([z], dtype=torch.float32))
    pixels = vh.denormalize(x, config["normalize_mean"], config["normalize_std"])
    return (pixels * 255).round().to(torch.int64).flatten()


def shot(tab, name, selector=".bd-article"):
    """A screenshot of the page in use, the part from the element `selector` on."""
    tab.page.locator(selector).first.scroll_into_view_if_needed()
    tab.page.screenshot(path=str(SCREENSHOTS / name))


def test_explorer_draws_what_pytorch_decodes(tab, site, explorer_models):
    open_explorer(tab, site)
    config = explorer_models["config"]
    codes_2d = [[0.0, 0.0], [1.5, -2.0], [-3.0, 2.5], [0.3, 3.9]]
    codes_32 = torch.randn(3, 32, generator=torch.Generator().manual_seed(0)).tolist()
    for name, show, canvas, codes in [
        ("latent2", "show2d", "#le-map-image", codes_2d),
        ("latent32", "show32", "#le-pc-image", codes_32),
    ]:
        for z in codes:
            tab.page.evaluate(f"(z) => latentExplorer.{show}(z)", z)
            shown = torch.tensor(canvas_greys(tab, canvas))
            expected = pytorch_greys(explorer_models[name], z, config)
            worst = int((shown - expected).abs().max())
            assert worst <= 1, f"{name}, z = {z}: a grey level differs by {worst}/255"
    assert not tab.problems(), "\n".join(tab.problems())


def test_explorer_map_and_sliders_change_the_image(tab, site):
    open_explorer(tab, site)
    shot(tab, "latent_explorer.png")
    tab.page.locator("#le-map").scroll_into_view_if_needed()
    map_box = tab.page.locator("#le-map").bounding_box()
    before = canvas_greys(tab, "#le-map-image")
    start = (
        map_box["x"] + 0.3 * map_box["width"],
        map_box["y"] + 0.7 * map_box["height"],
    )
    end = (
        map_box["x"] + 0.75 * map_box["width"],
        map_box["y"] + 0.3 * map_box["height"],
    )
    tab.page.mouse.move(*start)
    tab.page.mouse.down()
    seen = []
    for step in range(1, 6):
        t = step / 5
        tab.page.mouse.move(
            start[0] + t * (end[0] - start[0]), start[1] + t * (end[1] - start[1])
        )
        seen.append(canvas_greys(tab, "#le-map-image"))
    tab.page.mouse.up()
    z = tab.page.evaluate("() => latentExplorer.state.z2")
    assert z[0] == pytest.approx(2.0, abs=0.1) and z[1] == pytest.approx(
        1.6, abs=0.1
    ), z
    assert len({tuple(image) for image in [before, *seen]}) == 6, (
        "dragging over the map did not change the decoded image at every step"
    )
    shot(tab, "explorer_map_drag.png")

    for slider, canvas, screenshot in [
        ("#le-pc1", "#le-pc-image", "explorer_principal.png"),
        ("#le-t", "#le-mix-image", "explorer_interpolation.png"),
    ]:
        before = canvas_greys(tab, canvas)
        tab.page.locator(slider).focus()  # the keyboard moves a range input
        tab.page.keyboard.press("End")
        assert canvas_greys(tab, canvas) != before, f"moving {slider} changed nothing"
        shot(tab, screenshot, slider)
    assert not tab.problems(), "\n".join(tab.problems())


def test_explorer_encodes_a_drawn_digit_like_pytorch(tab, site, explorer_models):
    open_explorer(tab, site)
    pad = tab.page.locator("#le-draw")
    pad.scroll_into_view_if_needed()
    box = pad.bounding_box()
    # a 7: a bar from left to right, then a stroke down to the lower left
    stroke = [(0.25, 0.2), (0.75, 0.2), (0.62, 0.45), (0.45, 0.8)]
    points = [
        (box["x"] + u * box["width"], box["y"] + v * box["height"]) for u, v in stroke
    ]
    tab.page.mouse.move(*points[0])
    tab.page.mouse.down()
    for point in points[1:]:
        tab.page.mouse.move(*point, steps=8)
    tab.page.mouse.up()
    greys = canvas_greys(tab, "#le-input")  # the 28 x 28 input, read back from the page
    state = tab.page.evaluate("() => latentExplorer.state")
    assert greys == state["drawnGrey"] and 30 < sum(g > 0 for g in greys) < 400, (
        "the canvas 'what the encoder sees' should show the encoded input"
    )
    config = explorer_models["config"]
    x = vh.normalize(
        torch.tensor([greys]), config["normalize_mean"], config["normalize_std"]
    )
    for name, shown in [("latent32", "drawnMu32"), ("latent2", "drawnMu2")]:
        with torch.no_grad():
            mu = explorer_models[name].encode(x)[0][0]
        difference = (torch.tensor(state[shown]) - mu).abs().max().item()
        assert difference < 1e-4, f"{name}: μ differs from PyTorch's by {difference}"
    reconstruction = torch.tensor(canvas_greys(tab, "#le-recon32"))
    expected = pytorch_greys(explorer_models["latent32"], state["drawnMu32"], config)
    assert (reconstruction - expected).abs().max() <= 1
    shot(tab, "explorer_drawn.png", "#le-draw")
    assert not tab.problems(), "\n".join(tab.problems())


def test_explorer_page_weight(tab, site):
    """The explorer page's weight: every file it loads, as served (no compression)."""
    open_explorer(tab, site)
    sizes = tab.page.evaluate("""() => performance.getEntriesByType('resource')
        .concat(performance.getEntriesByType('navigation'))
        .map(entry => [entry.name, entry.decodedBodySize])""")
    own = sum(size for name, size in sizes if "/latent_explorer/" in name)
    total = sum(size for _, size in sizes)
    print(f"explorer page: {total / 1000:,.0f} kB in all, {own / 1000:,.0f} kB its own")
    assert own < 3_000_000, f"the explorer's own files weigh {own / 1000:,.0f} kB"
