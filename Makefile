# The two Quickstart commands (README.md) and their building blocks.
# Everything installs into .venv; pip and Go caches outside the repo are reused between runs.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: demo test venv cluster-binaries unit lock clean

# The test environment (dev extra) installs the exact versions CI last passed with
# (.ci/constraints.txt, regenerate with `make lock`), so a release published between two runs cannot
# change what `make test` tests; `make demo` and users get the newest releases pyproject allows.
CONSTRAINTS := .ci/constraints.txt

$(VENV)/.installed-%: pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(if $(filter dev,$*),-c $(CONSTRAINTS)) -e '.[$*]'
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

## lock: record the dev environment's versions as the constraints `make test` installs
lock: $(VENV)/.installed-dev
	{ echo "# make test installs the dev extra with these exact versions (make lock rewrites this file)"; \
	  $(PY) -m pip freeze --exclude-editable | sort; } > $(CONSTRAINTS)

clean:
	rm -rf $(VENV) .pytest_cache runs
