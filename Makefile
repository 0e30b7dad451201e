# aptguard: `make demo` runs a mirror of a sample signed upstream; `make test` runs the tests.
VENV   ?= .venv
PYTHON ?= python3
BIN     = $(VENV)/bin
# Debian packages the tests and the demo use (real gpg, real dpkg-deb, real apt, real nginx).
DEBS    = gnupg dpkg apt xz-utils nginx-light curl

.PHONY: setup debs demo test lint clean

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

clean:
	rm -rf $(VENV) demo .pytest_cache
