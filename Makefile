# ws2http: the commands a person (and CI) runs.
#
#   make demo     the chat demo: PHP example API + one gateway, prints the page URL
#   make cluster  3 gateways behind HAProxy with the PHP example (scripts/cluster.sh)
#   make test     installs the test dependencies, then runs every test
#
# Dependencies come from Debian's packages (apt-get, as root or through sudo) and, for
# the browser test, playwright-core from npm; scripts/install-deps.sh installs only
# what is missing.

CARGO ?= cargo

.PHONY: help demo cluster test deps build

help:
	@sed -n 's/^#   make /  make /p' Makefile

build:
	$(CARGO) build -p ws2http

demo:
	scripts/install-deps.sh demo
	$(CARGO) build -p ws2http
	scripts/demo.sh

cluster:
	scripts/install-deps.sh cluster
	$(CARGO) build -p ws2http
	scripts/cluster.sh

deps:
	scripts/install-deps.sh test

test: deps
	@$(CARGO) nextest --version >/dev/null 2>&1 || { \
	  echo "cargo-nextest is missing; installing it from crates.io (a few minutes)" >&2; \
	  $(CARGO) install cargo-nextest --locked; }
	$(CARGO) nextest run --workspace
