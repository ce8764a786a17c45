"""Small fixes to the HTML of the book's website (a local Sphinx extension, loaded by
_config.yml).

1. The chapters are read through the symlink book/notebooks -> ../notebooks, so
sphinx-book-theme builds their
   Colab, Binder, "source" and "edit" links with the path book/notebooks/NN.ipynb.
   GitHub, and so Colab, do not
   follow a symlinked folder in such a path; the notebooks' real place in the repository
   is notebooks/NN.ipynb.
2. With Sphinx 7.4, an inline script that an extension adds during the build
(sphinx-thebe's
   ``const THEBE_JS_URL = ...``, sphinx-togglebutton's selector) is written twice into
   every page, once with the
   file name None and once with '', so the browser reports "Identifier 'THEBE_JS_URL'
   has already been declared".
   Each page keeps the first copy of each script.
3. The latent explorer's weights (book/_extra/latent_explorer/weights.js) are written by
   notebooks/08_latent_explorer.ipynb, not committed: a build without them warns.
"""

from pathlib import Path

from sphinx.util import logging

EXPLORER_WEIGHTS = "_extra/latent_explorer/weights.js"  # relative to book/

LINK_PATH = "book/notebooks/"
REAL_PATH = "notebooks/"


def _rewrite(buttons):
    for button in buttons:
        if isinstance(button.get("url"), str):
            button["url"] = button["url"].replace(LINK_PATH, REAL_PATH)
        if isinstance(
            button.get("buttons"), list
        ):  # a group of buttons, such as the launch buttons
            _rewrite(button["buttons"])


def rewrite_notebook_links(app, pagename, templatename, context, doctree):
    if pagename.startswith("notebooks/") and isinstance(
        context.get("header_buttons"), list
    ):
        _rewrite(context["header_buttons"])


def drop_duplicate_scripts(app, pagename, templatename, context, doctree):
    scripts = context.get("script_files")
    if not isinstance(scripts, list):
        return
    seen, unique = set(), []
    for script in scripts:
        key = (
            script.filename or "",
            script.priority,
            tuple(sorted(script.attributes.items())),
        )
        if key not in seen:
            seen.add(key)
            unique.append(script)
    context["script_files"] = unique


def warn_if_explorer_weights_are_missing(app):
    if not (Path(app.confdir) / EXPLORER_WEIGHTS).is_file():
        logging.getLogger(__name__).warning(
            f"book/{EXPLORER_WEIGHTS} is missing: the latent explorer will not run;"
            " execute notebooks/08_latent_explorer.ipynb (it exports the weights)"
        )


def setup(app):
    # sphinx-book-theme adds its buttons at priority 501; run after it.
    app.connect("html-page-context", rewrite_notebook_links, priority=600)
    app.connect("html-page-context", drop_duplicate_scripts, priority=600)
    app.connect("builder-inited", warn_if_explorer_weights_are_missing)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
