# The two commands of the README, and the chores that keep the notebooks, the package and the docs in step.
# `make demo`: set up and run the main job. `make test`: set up and run every test.
SHELL := /bin/bash
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is the CPU build pinned here; it is installed first so no dependency can pull a CUDA build.
TORCH ?= torch==2.13.0
NB_TEXT := nbs/text
MAKE_START := $(shell date +%s)

.PHONY: demo test venv venv-dev browser sync check-sync venv-oldjax test-oldjax

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --no-compile --upgrade pip

venv: $(BIN)/python
	$(BIN)/pip install -q --no-compile -e .

# Byte-compile an environment's packages once, on every core. Where PYTHONDONTWRITEBYTECODE is set (and pip ran with
# --no-compile), every test process and notebook kernel would otherwise compile jax, torch, transformers and
# diffusers from source again: 2-6 s each, a hundred times a test run (CI: 46 s less in all, BENCHMARKS §10). Packages'
# own test folders are skipped; a file that does not compile is left to its import, so the status is not checked.
PYC = $(1)/bin/python -m compileall -q -j 0 -x '/(tests?|testing)/' "$$($(1)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" >/dev/null 2>&1 || :

venv-dev: $(BIN)/python
	$(BIN)/pip install -q --no-compile "$(TORCH)"
	$(BIN)/pip install -q --no-compile -e ".[dev]"
	$(BIN)/pip check
	$(call PYC,$(VENV))

demo: venv
	$(BIN)/fsdit demo --out demo

# Headless Chromium for the explorer's browser test (Debian's package; needs root, as on CI).
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && apt-get install -y -qq chromium >/dev/null; } || echo "chromium not installed: the browser test will be skipped"

# One persistent XLA compilation cache for a test run: the tests' subprocesses (8 devices, two processes, the demo,
# the trainer's faults) and the notebooks compile many of the same programs. Size-capped, so its file lock keeps
# concurrent workers from reading a half-written entry. Only compiles over 0.5 s are kept: keeping every eager op's
# too made the notebooks 40% slower (the lock and the writes cost more than the compiles they save). Delete the
# folder to test cold compiles.
TEST_JAX_CACHE := JAX_COMPILATION_CACHE_DIR="$(CURDIR)/.cache/jax-tests" JAX_COMPILATION_CACHE_MAX_SIZE=4000000000 \
	JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0.5

# Each part prints its seconds (BENCHMARKS.md §10 reads them off CI's log).
test: venv-dev browser
	@echo "== setup: $$(( $$(date +%s) - $(MAKE_START) )) s"
	@s=$$(date +%s); $(TEST_JAX_CACHE) $(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=15 tests \
	  && echo "== pytest: $$(( $$(date +%s) - s )) s"
	@s=$$(date +%s); $(TEST_JAX_CACHE) PATH="$(BIN):$$PATH" $(BIN)/nbdev_test --n_workers 2 --timing \
	  && echo "== nbdev_test: $$(( $$(date +%s) - s )) s"

# The notebooks are the source: export the package, clean the notebooks, write their text forms and README.md.
sync:
	PATH="$(BIN):$$PATH" $(BIN)/nbdev_export
	PATH="$(BIN):$$PATH" $(BIN)/nbdev_clean
	$(BIN)/python tools/text_forms.py write

check-sync:
	$(BIN)/python tools/text_forms.py check

# A second environment: the oldest JAX/Flax the package claims (Kaggle's TPU image) for the model, sampler and
# trainer tests, plus the fid extra for the FID feature-path test. torchvision is pinned to the release made for
# the pinned torch, so pip never swaps the CPU torch for another build.
OLD_VENV := .venv-oldjax
TORCHVISION ?= torchvision==0.28.0
# `venv-oldjax` installs everything but fsdit itself (its editable build writes into the tree, which `make test`'s own
# install is doing at the same time when CI runs this in the background); `test-oldjax` adds fsdit, checks, and tests.
# CI calls `make test-oldjax OLDJAX_READY=1` after the background install.
OLDJAX_PINS := "$(TORCHVISION)" "jax==0.7.2" "jaxlib==0.7.2" "flax==0.12.0"
REQS = $(shell $(PY) -c "import configparser as c; p = c.ConfigParser(); p.read('settings.ini'); \
	print(' '.join(chr(39) + r + chr(39) for k in ('requirements', 'dev_requirements', 'fid_requirements') for r in p['DEFAULT'][k].split()))")
venv-oldjax:
	[ -x $(OLD_VENV)/bin/python ] || $(PY) -m venv $(OLD_VENV)
	$(OLD_VENV)/bin/pip install -q --no-compile --upgrade pip
	$(OLD_VENV)/bin/pip install -q --no-compile "$(TORCH)"
	$(OLD_VENV)/bin/pip install -q --no-compile $(OLDJAX_PINS) $(REQS)
	$(call PYC,$(OLD_VENV))

test-oldjax:
	[ -n "$(OLDJAX_READY)" ] || $(MAKE) venv-oldjax
	$(OLD_VENV)/bin/pip install -q --no-compile --no-deps -e .
	$(OLD_VENV)/bin/pip check
	$(TEST_JAX_CACHE) $(OLD_VENV)/bin/python -m pytest -q -n 2 --dist loadfile -m "oldjax or fid" tests
