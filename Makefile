# The two commands: `make demo` and `make test`. Both create .venv when missing and install
# everything the project needs (torch 2.14.1 / torchvision 0.29.1 come from the local wheel
# index configured for pip on the machine; other packages from PyPI). Keep pip's byte-compiling:
# where PYTHONDONTWRITEBYTECODE is set (it is on our CI machines) pip's .pyc files are the only
# ones, and without them every Ray worker compiles torch, Ray and MLflow again when it starts.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
CONFIG ?= configs/demo.yaml

.PHONY: demo test test-fast test-cluster install chromium ui clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip wheel

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --progress-bar off -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/vidkd pipeline --config $(CONFIG)

# The UI test drives headless Chromium (Debian's package); install it only when it is missing.
chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || \
	    echo "warning: chromium could not be installed; the browser check of the UI test will be skipped"; }

test: $(STAMP) chromium
	$(PY) -m pytest -q -m "not multinode and not own_ray_cluster"

# Clusters of their own (a few minutes): a head started by `vidkd cluster up` that runs a submitted
# job, and nodes of a multi-node Ray cluster on this machine that die under a running job. CI runs it after `make test`.
test-cluster: $(STAMP)
	$(PY) -m pytest -q -m "multinode or own_ray_cluster"

# The fast tier: no Ray instance, no browser, no end-to-end pipeline (a few minutes).
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not ray and not browser"

ui: $(STAMP)
	$(VENV)/bin/vidkd ui

clean:
	rm -rf runs data/synth .pytest_cache
