# The two README commands. Each creates .venv when missing and installs everything.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.mmrec-installed
ARCH   := $(shell uname -m)

ifeq ($(ARCH),x86_64)
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
else
TORCH_PINS := torch==2.9.1 torchvision==0.24.1
endif

.PHONY: demo test test-slow bench install clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/mmrec demo --out demo_out

# Exit code 5 (no tests collected) must fail loudly, never pass as green.
test: $(STAMP)
	@$(PY) -m pytest -m "not slow" -n 2 -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "ERROR: pytest collected no tests"; exit 1; fi; exit $$rc

test-slow: $(STAMP)
	$(PY) -m pytest -m slow -q

clean:
	rm -rf $(VENV) demo_out .pytest_cache
