# mip: `make run` starts the server on the demo map; `make test` runs the test suite.
# Both set up everything first: .venv, the requirements, the data folders, the demo maps.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
MAP := WY_CO_Peach
GEO_MAP := WY_CO_Peach_geo

.PHONY: run test bench setup lint clean

run: $(VENV)/.runtime setup
	source ./env.sh && exec $(PY) mip_server.py

test: $(VENV)/.dev $(VENV)/.debian setup
	source ./env.sh && $(PY) -m pytest -q

bench: $(VENV)/.dev setup
	source ./env.sh && $(PY) bench/run.py --write docs/benchmarks.md

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check .

# The data folders and the two demo maps under $TA1_INPUTS_DIR/maps/: $(MAP), a compressed,
# tiled TIFF without georeferencing (as most scans come), and $(GEO_MAP), the same map as a
# GeoTIFF. Each is (re)written when missing or older than modules/sample_map.py.
setup: $(VENV)/.runtime
	source ./env.sh && mkdir -p "$$TA1_INPUTS_DIR/maps" "$$TA1_OUTPUTS_DIR" "$$TA1_TEMPS_DIR" \
	    "$$TA1_RUNS_DIR" "$$TA1_REPOS_DIR" && \
	  plain="$$TA1_INPUTS_DIR/maps/$(MAP)/$(MAP).tif" && \
	  geo="$$TA1_INPUTS_DIR/maps/$(GEO_MAP)/$(GEO_MAP).tif" && \
	  { [ "$$plain" -nt modules/sample_map.py ] || \
	    $(PY) modules/sample_map.py --no-georef "$$plain"; } && \
	  { [ "$$geo" -nt modules/sample_map.py ] || $(PY) modules/sample_map.py "$$geo"; }

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

# Debian packages the tests need, installed once through apt-get (as root, or with sudo):
# chromium for the console's browser tests, systemd for `systemd-analyze verify` of the unit,
# caddy for the TLS front the tests put before the server.
# The stamp is redone when this Makefile changes; packages already present are not fetched.
DEBIAN_PACKAGES := chromium systemd caddy
$(VENV)/.debian: Makefile | $(PY)
	@missing=$$(for p in $(DEBIAN_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  echo "apt-get install $$missing"; \
	  $$sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq \
	    --no-install-recommends $$missing >/dev/null; \
	fi
	touch $@

clean:
	rm -rf $(VENV) data .mip_password
