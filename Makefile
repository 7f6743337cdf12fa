# edgekit: every set-up step lives here, so a fresh clone needs only `make demo`
# or `make test`.
PY       ?= python3
VENV     ?= .venv
DEVICE   ?= .venv-device
TFLITE   ?= .venv-tflite
PIP_FLAGS ?= --quiet --disable-pip-version-check
export TF_USE_LEGACY_KERAS := 1
export TF_CPP_MIN_LOG_LEVEL := 2
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: help install device-env tflite-env demo test test-host test-device test-tflite test-arm64 test-armhf bench docs clean

help:
	@echo "make demo    train, convert (QAT), run an agent, collect, relabel, retrain: the whole loop"
	@echo "make test    every test: host side, device side on ai-edge-litert and on tflite-runtime (side by side)"
	@echo "make test-arm64  the board side on 64-bit ARM: device tests + check/bench/run in a Debian arm64"
	@echo "                 root under qemu-user (root, debootstrap, qemu-user-static; root cached in /var/cache)"
	@echo "make test-armhf  the same on 32-bit ARM with tflite-runtime 2.14 (not in CI; docs/agent.md)"
	@echo "make bench   the measurements in bench/"

# Workstation environment: TensorFlow, tf-keras, tfmot, plus the device side.
$(VENV)/.installed: pyproject.toml
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/pip install $(PIP_FLAGS) --upgrade pip
	$(VENV)/bin/pip install $(PIP_FLAGS) -e '.[host,dev,browser]'
	touch $@
install: $(VENV)/.installed

# Board environments: no TensorFlow. One per interpreter the boards may have.
$(DEVICE)/.installed: pyproject.toml
	test -x $(DEVICE)/bin/python || $(PY) -m venv $(DEVICE)
	$(DEVICE)/bin/pip install $(PIP_FLAGS) --upgrade pip
	$(DEVICE)/bin/pip install $(PIP_FLAGS) -e '.[device,dev]'
	touch $@
device-env: $(DEVICE)/.installed

$(TFLITE)/.installed: pyproject.toml
	test -x $(TFLITE)/bin/python || $(PY) -m venv $(TFLITE)
	$(TFLITE)/bin/pip install $(PIP_FLAGS) --upgrade pip
	$(TFLITE)/bin/pip install $(PIP_FLAGS) -e '.[device-tflite,dev]'
	touch $@
tflite-env: $(TFLITE)/.installed

demo: install
	$(VENV)/bin/edgekit demo

# The three suites run side by side (each prints when it ends): the device suites mostly wait on brokers
# and agents, so they cost the host suite little. Every test broker is private, on a free port.
test: install device-env tflite-env
	$(MAKE) --no-print-directory -j3 -Otarget test-host test-device test-tflite

test-host: install
	$(VENV)/bin/python -m pytest tests/edgekit tests/test_layout.py tests/test_docs.py --durations=15

test-device: device-env
	EDGEKIT_EXPECT_RUNTIME=ai_edge_litert $(DEVICE)/bin/python -m pytest tests/device_agent --durations=10

test-tflite: tflite-env
	EDGEKIT_EXPECT_RUNTIME=tflite_runtime $(TFLITE)/bin/python -m pytest tests/device_agent --durations=10

# The board side on ARM, emulated (tools/arm/test-root.sh; docs/agent.md, "ARM boards").
test-arm64:
	tools/arm/test-root.sh arm64

test-armhf:
	tools/arm/test-root.sh armhf

bench: install device-env
	$(VENV)/bin/python bench/bench_convert.py
	$(VENV)/bin/python bench/bench_agent.py
	$(VENV)/bin/python bench/bench_collector.py
	$(VENV)/bin/python bench/bench_delivery.py
	$(VENV)/bin/python bench/bench_loop.py
	$(VENV)/bin/python bench/bench_update.py
	$(VENV)/bin/python bench/bench_identity.py
	$(DEVICE)/bin/python bench/bench_signature.py
	$(VENV)/bin/python bench/bench_shrink.py

clean:
	rm -rf build *.egg-info .pytest_cache demo-out
