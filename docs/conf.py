"""Sphinx configuration: the subspace_optax documentation site.

Build (offline, about half a minute):

  python -m pip install -e '.[docs]'
  python -m sphinx -W --keep-going -b html docs docs/_build/html

Pages under ``docs/_generated/`` are written here at every build, so they
follow the code: one API page per public module, listing the names in the
module's ``__all__`` (or, without one, its public names defined in
subspace_optax); copies of the notebooks, rendered without running them; and
a page with every table in benchmarks/results/.
"""

import importlib
import inspect
import pathlib
import re
import sys

DOCS = pathlib.Path(__file__).resolve().parent
ROOT = DOCS.parent
GENERATED = DOCS / '_generated'
sys.path.insert(0, str(ROOT))

# pylint: disable-next=g-import-not-at-top,wrong-import-position
import subspace_optax

project = 'subspace_optax'
author = 'The subspace_optax authors'
# pylint: disable-next=redefined-builtin
copyright = '2026, The subspace_optax authors'
release = subspace_optax.__version__
# The repository's address (a placeholder until the project is published).
REPOSITORY = 'https://github.com/subspace-optax/subspace_optax'

extensions = [
    'myst_nb',  # Markdown pages (myst-parser) and notebooks
    'sphinx.ext.autodoc',
    'sphinx.ext.autosummary',
    'sphinx.ext.mathjax',
    'sphinx.ext.napoleon',  # the docstrings' Args: / Returns: sections
]
exclude_patterns = ['_build', 'README.md']
nb_execution_mode = 'off'  # notebooks are shown as written, never run
myst_enable_extensions = ['dollarmath']
myst_heading_anchors = 3
autodoc_member_order = 'bysource'
autodoc_typehints = 'signature'
autodoc_preserve_defaults = True
autosummary_generate = False
napoleon_google_docstring = True
napoleon_numpy_docstring = False

html_theme = 'sphinx_book_theme'
html_title = 'subspace_optax'
html_theme_options = {
    'repository_url': REPOSITORY,
    'use_repository_button': True,
    'show_toc_level': 2,
}

# --- API reference, generated from each public module's names --------------

# The public modules, in the order their pages appear. A module that does not
# exist (yet) is skipped.
PUBLIC_MODULES = (
    'subspace_optax',
    'subspace_optax.bases',
    'subspace_optax.refresh',
    'subspace_optax.transforms',
    'subspace_optax.continual',
    'subspace_optax.state_sizes',
    'subspace_optax.merging',
)


def _public_names(module):
  """``__all__``, or the public names the module takes from subspace_optax."""
  names = getattr(module, '__all__', None)
  if names is None:
    names = [
        name for name, value in vars(module).items()
        if not name.startswith('_')
        and getattr(value, '__module__', '').startswith('subspace_optax')
    ]
  # Submodules have pages of their own.
  return [n for n in names if not inspect.ismodule(getattr(module, n))]


def _directive(value):
  if inspect.isclass(value):
    return 'autoclass'
  if callable(value):
    return 'autofunction'
  return 'autodata'


def _api_page(module_name, documented):
  """One reST page: the module's docstring, a summary table, every object."""
  module = importlib.import_module(module_name)
  names = _public_names(module)
  here = [n for n in names if id(getattr(module, n)) not in documented]
  elsewhere = [n for n in names if id(getattr(module, n)) in documented]
  title = f'``{module_name}``'
  lines = [title, '=' * len(title), '', f'.. automodule:: {module_name}', '',
           f'.. currentmodule:: {module_name}', '']
  if here:
    lines += ['.. autosummary::', '']
    lines += [f'   {name}' for name in here]
    lines += ['']
  for name in here:
    documented[id(getattr(module, name))] = f'{module_name}.{name}'
    lines += [f'.. {_directive(getattr(module, name))}:: {name}', '']
  if elsewhere:
    lines += ['Also available here (documented once, where first listed):', '']
    lines += [f'- :obj:`{name} <{documented[id(getattr(module, name))]}>`'
              for name in elsewhere]
    lines += ['']
  return '\n'.join(lines)


def _write_if_changed(path, text):
  # Rewriting an unchanged page would make Sphinx rebuild it every time.
  if not path.exists() or path.read_text() != text:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _generate_api_pages():
  documented = {}
  pages = []
  for module_name in PUBLIC_MODULES:
    try:
      importlib.import_module(module_name)
    except ModuleNotFoundError as error:
      if error.name != module_name:
        raise
      continue
    page = GENERATED / 'api' / f'{module_name}.rst'
    _write_if_changed(page, _api_page(module_name, documented))
    pages.append(page.stem)
  for stale in (GENERATED / 'api').glob('*.rst'):
    if stale.stem not in pages and stale.stem != 'index':
      stale.unlink()  # a module that is no longer public
  index = ['API reference', '=============', '',
           'Every public name, by module, generated from the docstrings.', '',
           '.. toctree::', '   :maxdepth: 1', '']
  index += [f'   {page}' for page in pages]
  _write_if_changed(GENERATED / 'api' / 'index.rst', '\n'.join(index) + '\n')


def _copy_notebooks():
  notebooks = sorted((ROOT / 'notebooks').glob('*.ipynb'))
  for notebook in notebooks:
    _write_if_changed(GENERATED / 'notebooks' / notebook.name,
                      notebook.read_text())
  for copy in (GENERATED / 'notebooks').glob('*.ipynb'):
    if copy.name not in {notebook.name for notebook in notebooks}:
      copy.unlink()  # a notebook that was removed


def _benchmark_results_page():
  """Every table a benchmark script wrote to benchmarks/results/*.md."""
  lines = [
      '# Benchmark result tables', '',
      'Every table as the benchmark script wrote it, next to its JSON in',
      '`benchmarks/results/`; each names the command that produced it. The',
      'protocols and the discussion are on the [benchmarks](../benchmarks.md)',
      'page.', '']
  for table in sorted((ROOT / 'benchmarks' / 'results').glob('*.md')):
    lines += [f'```{{include}} ../../benchmarks/results/{table.name}',
              ':heading-offset: 1', ':relative-images:', '```', '']
  _write_if_changed(GENERATED / 'benchmark_results.md', '\n'.join(lines))


_generate_api_pages()
_copy_notebooks()
_benchmark_results_page()

# --- Links in the Markdown files included from outside docs/ ----------------

# The repository files that have a page here besides docs/*.md (and
# benchmarks/results/*.md, all on the generated benchmark_results page); any
# other relative link in an included file (README.md, benchmarks/README.md)
# points at the repository.
PAGES = {
    'README.md': 'index',
    'benchmarks/README.md': 'benchmarks',
}
# A link (not an image: the include's :relative-images: handles those).
_LINK = re.compile(
    r'(?<!!)(\[[^\]]*\])\((?!https?:|#|mailto:)([^)#\s]+)(#[^)\s]*)?\)')


def _rewrite_links(app, relative_path, parent_docname, content):
  """Points an included file's relative links at pages or the repository."""
  del parent_docname
  source = pathlib.Path(app.srcdir, relative_path).resolve()
  base = source.parent.relative_to(ROOT)

  def replace(match):
    text, path, anchor = match.group(1), match.group(2), match.group(3) or ''
    target = re.sub(r'(^|/)[^/]+/\.\./', r'\1', (base / path).as_posix())
    if target in PAGES:  # links from the docs root
      return f'{text}(/{PAGES[target]}.md{anchor})'
    if re.fullmatch(r'docs/[^/]+\.md', target) and (ROOT / target).exists():
      return f'{text}(/{target[len("docs/"):]}{anchor})'
    if re.fullmatch(r'benchmarks/results/[^/]+\.md', target):
      return f'{text}(/_generated/benchmark_results.md)'
    return f'{text}({REPOSITORY}/blob/main/{target}{anchor})'

  content[0] = _LINK.sub(replace, content[0])


def setup(app):
  app.connect('include-read', _rewrite_links)
