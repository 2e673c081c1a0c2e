# mip: `make run` starts the server on the demo map; `make test` runs the test suite.
# Both set up everything first: .venv, the requirements, the data folders, the sample map.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
MAP := WY_CO_Peach

.PHONY: run test bench setup lint clean

run: $(VENV)/.runtime setup
	source ./env.sh && exec $(PY) mip_server.py

test: $(VENV)/.dev setup
	source ./env.sh && $(PY) -m pytest -q

bench: $(VENV)/.dev setup
	source ./env.sh && $(PY) bench/run.py

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check .

# The data folders and the sample map at $TA1_INPUTS_DIR/maps/$(MAP)/$(MAP).tif.
setup: $(VENV)/.runtime
	source ./env.sh && mkdir -p "$$TA1_INPUTS_DIR/maps" "$$TA1_OUTPUTS_DIR" "$$TA1_TEMPS_DIR" \
	    "$$TA1_RUNS_DIR" "$$TA1_REPOS_DIR" && \
	  { [ -f "$$TA1_INPUTS_DIR/maps/$(MAP)/$(MAP).tif" ] || \
	    $(PY) modules/sample_map.py "$$TA1_INPUTS_DIR/maps/$(MAP)/$(MAP).tif"; }

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.runtime: requirements.txt modules/requirements.txt | $(PY)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt \
	    -r modules/requirements.txt
	touch $@

$(VENV)/.dev: requirements.txt requirements-dev.txt modules/requirements.txt | $(PY)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-dev.txt \
	    -r modules/requirements.txt
	touch $@ $(VENV)/.runtime

clean:
	rm -rf $(VENV) data .mip_password
