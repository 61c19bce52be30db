# The one bootstrap path. On a fresh machine (as root, or with sudo):
#   make demo   - installs everything, then runs the whole pipeline on the embedded default
#   make test   - installs everything, then runs the test suite (what .ci/run calls)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Debian packages for headless rendering: Mesa EGL (llvmpipe on CPU) and OSMesa as the fallback.
APT_PACKAGES := libegl1 libegl-mesa0 libgl1-mesa-dri libgl1 libosmesa6
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test lint bench install lock system-packages clean

demo: $(STAMP)
	$(BIN)/occ demo

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check occ_core moho_bridge tasks flows tests benchmarks

bench: $(STAMP)
	$(BIN)/python -m benchmarks.ingest

install: $(STAMP)

# constraints.txt is the full lock: every package of the tested environment at its tested version.
# Regenerate it from a working .venv after changing dependencies (then run `make test` on a fresh clone).
# torch's local label (+cpu) is dropped so the pin also matches the wheel on PyPI's simple index;
# PyOpenGL is locked at pyrender's own pin, since 3.1.10 goes over it with --no-deps afterwards.
lock: $(STAMP)
	{ echo "# The lock: every package of the tested environment. Regenerate with 'make lock'."; \
	  echo "# make installs with -c constraints.txt, so pip never swaps the CPU torch for a CUDA build."; \
	  $(BIN)/python -m pip freeze --exclude-editable --all \
	    | grep -v -E '^(pip|setuptools|wheel)==' \
	    | sed -e 's/^\(torch==[^+]*\)+.*/\1/' -e 's/^PyOpenGL==.*/PyOpenGL==3.1.0/' \
	    | LC_ALL=C sort -f; } > constraints.txt.tmp
	mv constraints.txt.tmp constraints.txt
	touch $(STAMP)

system-packages:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages: $$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; \
	fi

# torch first, pinned by constraints.txt: any unpinned torch resolves to a CUDA build of several GB.
# PyOpenGL 3.1.10 goes over pyrender's 3.1.0 pin (--no-deps) because OSMesa needs it; EGL works with both.
# pip byte-compiles on one core (about 100 s of a 170 s install here); compileall does it on every core
# afterwards (50 s on 2). It skips the few files that are not Python 3.11, as pip's own pass does.
$(STAMP): pyproject.toml constraints.txt | system-packages
	[ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	set -o pipefail; $(BIN)/python -m pip install -q --no-compile -c constraints.txt "torch==2.13.0" 2>&1 | { grep -v "is ignored: it is neither" || true; }
	set -o pipefail; $(BIN)/python -m pip install -q --no-compile -c constraints.txt -e ".[dev]" 2>&1 | { grep -v "is ignored: it is neither" || true; }
	$(BIN)/python -m pip install -q --no-compile --no-deps "PyOpenGL==3.1.10"
	$(BIN)/python -m compileall -q -j 0 $(VENV)/lib > /dev/null 2>&1 || true
	touch $(STAMP)

clean:
	rm -rf $(VENV) .occ .pytest_cache
