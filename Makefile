# The two commands of the README: `make run` (dev stack + worker) and `make test` (everything).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup run test lint unit bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

setup: $(BIN)/.installed

run: setup
	$(BIN)/fileserver dev

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy fileserver

unit: setup
	$(BIN)/python -m pytest tests/unit -q -p no:cacheprovider

# Debian packages the suite uses: headless Chromium (the review page), espeak-ng, sox and
# ffmpeg (the speech-analysis corpus is made at test time).
TEST_DEBS := chromium espeak-ng sox ffmpeg

test: lint
	@missing=""; for c in $(TEST_DEBS); do command -v $$c >/dev/null || missing=1; done; \
	if [ -n "$$missing" ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(TEST_DEBS); fi
	$(BIN)/python -m tests.servers.kafka --fetch
	$(BIN)/python -m tests.servers.toxiproxy --fetch
	$(BIN)/python -m tests.servers.s3proxy --fetch
	$(BIN)/python -m tests.servers.versitygw --fetch
	$(BIN)/python -m bench.peers build
	$(BIN)/python -m pytest -p no:cacheprovider -ra --durations=15

bench: setup
	$(BIN)/python -m bench --case throughput,naive,peers

clean:
	rm -rf $(VENV) build dist *.egg-info

# requirements.lock: the image's runtime dependencies (and the build-system's setuptools
# and wheel) pinned with hashes, for `pip install --require-hashes` in the Dockerfile.
# Run it after changing pyproject.toml's dependencies (tests/test_deploy.py checks).
.PHONY: lock
lock: setup
	$(BIN)/python -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['build-system']['requires'], sep='\n')" \
	| $(BIN)/uv pip compile pyproject.toml - --generate-hashes --universal \
	    --python-version 3.11 --custom-compile-command 'make lock' -o requirements.lock
