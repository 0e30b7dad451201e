# aptguard: `make demo` runs a mirror of a sample signed upstream; `make test` runs the tests.
VENV   ?= .venv
PYTHON ?= python3
BIN     = $(VENV)/bin
# Debian packages the tests and the demo use (real gpg, real dpkg-deb, real apt, real nginx, real chromium).
DEBS    = gnupg dpkg apt xz-utils nginx-light curl dpkg-dev chromium

.PHONY: setup debs demo test lint clean bench

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

# Installs the missing Debian packages when run as root; otherwise says which are missing.
debs:
	@missing=$$(for p in $(DEBS); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian packages: $$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "please install: sudo apt-get install $$missing"; exit 1; fi; \
	fi

demo: setup debs
	$(BIN)/python -m fixtures.demo

lint: setup
	$(BIN)/ruff check aptguard fixtures tests
	$(BIN)/ruff format --check aptguard fixtures tests

test: setup debs lint
	$(BIN)/pytest -q

# Benchmarks (README, "Benchmarks"): sync against aptly, apt-mirror2 and the floor; a full-size index; promote.
# BENCH_ARGS="--runs 5 --shapes small" narrows the sync one. Needs root or aptly/nginx installed.
PEERS = bench/.venv-peers
bench: setup debs
	@command -v aptly >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get install -y -qq aptly >/dev/null; } || { echo "please install aptly"; exit 1; }
	@[ -x $(PEERS)/bin/apt-mirror ] || { $(PYTHON) -m venv $(PEERS) && $(PEERS)/bin/pip install -q apt-mirror; }
	$(BIN)/python bench/sync_vs_aptly.py --results bench/RESULTS.md $(BENCH_ARGS)
	$(BIN)/python bench/parse_index.py --deb822 --results bench/RESULTS.md
	$(BIN)/python bench/promote.py --results bench/RESULTS.md
	$(BIN)/python bench/serve.py
	$(BIN)/python bench/s3.py

clean:
	rm -rf $(VENV) demo .pytest_cache
