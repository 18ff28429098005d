# The two commands of the README, plus `make down`.
#   make demo   whole local stack + 5 simulated buyers + 1,000 solar leads + report
#   make test   the whole test suite (starts its own Kafka and warehouse)
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt 2>/dev/null | sha1sum | cut -c1-12)

.PHONY: demo test down install

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@command -v java >/dev/null && command -v mvn >/dev/null || { \
	  echo "installing Java 17 and Maven (Kafka runs from Maven Central jars)"; \
	  apt-get update -qq && apt-get install -y -qq openjdk-17-jre-headless maven; }
	@command -v chromium >/dev/null || { \
	  echo "installing Chromium (the HTML report's browser test drives it headless)"; \
	  apt-get update -qq && apt-get install -y -qq chromium; }
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -c constraints.txt -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $@

demo: $(STAMP)
	$(VENV)/bin/pingpost demo

test: $(STAMP)
	$(VENV)/bin/pytest

down:
	$(VENV)/bin/pingpost down
