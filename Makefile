# kinjax: two entry points for a fresh machine (python3 and make present).
#   make book   set up .venv and build the executed tutorial book into _build/html
#   make test   set up .venv and run the whole test suite (pytest + nbval on the notebooks)
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.kinjax-installed

.PHONY: book test notebooks clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[all]"
	touch $(STAMP)

# The .ipynb files are generated from the jupytext MyST sources and committed (Colab opens
# them from GitHub); tests/test_book.py checks that they match the sources.
notebooks: $(STAMP)
	$(BIN)/jupytext --quiet --update --to ipynb notebooks/*.md

book: $(STAMP)
	$(BIN)/jupyter-book build . -W --keep-going

test: notebooks
	$(BIN)/python -m pytest tests
	$(BIN)/python -m pytest --nbval-lax --nbval-cell-timeout=900 -p no:cacheprovider notebooks/*.ipynb

clean:
	rm -rf _build notebooks/*.ipynb
