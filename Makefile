# The two Quickstart commands (README.md) and their building blocks.
# Everything installs into .venv; pip and Go caches outside the repo are reused between runs.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: demo test venv cluster-binaries unit clean

$(VENV)/.installed-%: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[$*]'
	touch $@

## demo: run the embedded demo job (a tiny model learns arithmetic with GRPO on this CPU)
demo: $(VENV)/.installed-runtime
	$(VENV)/bin/kuberl local examples/demo-cpu.yaml

## test: install everything, build the local control plane once, run every test tier this machine can run
test: $(VENV)/.installed-dev cluster-binaries
	$(PY) -m pytest $(PYTEST_ARGS)

## cluster-binaries: build etcd, kube-apiserver, scheduler, controller-manager, kwok, kubectl, helm (cached)
cluster-binaries: $(VENV)/.installed-dev
	$(VENV)/bin/kuberl dev-cluster build

unit: $(VENV)/.installed-dev
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache runs
