# Developer entry points. `make help` lists them; the scripts they call are in scripts/.

VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
FUZZTIME ?= 1m
BENCH_ROUNDS ?= 3
export FUZZTIME BENCH_ROUNDS

.PHONY: help test test-versions demo bench bench-go fuzz soak stress build clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  make %-13s %s\n", $$1, $$2}'

test: ## run all checks and tests: gofmt, go vet, go test -race (installs redis-server if missing)
	scripts/test.sh

test-versions: ## run the suites that start redis-server against Redis 6.0.20 and 7.2.6, built from REDIS_SOURCES (default ../shared/redis)
	scripts/test-versions.sh

demo: ## run the proxy end to end on loopback against a fake Azure cache, with a token rotation (~1 min)
	scripts/demo.sh

bench: ## compare the proxy with direct TLS, stunnel, haproxy and nginx using redis-benchmark (BENCH_ROUNDS=3), count system calls at -P 16; writes .bench/results.md
	scripts/bench.sh

bench-go: ## run the Go benchmarks (command reading, reply framing, proxied round trip)
	go test -run='^$$' -bench=. -benchmem ./...

fuzz: ## run each fuzz target for FUZZTIME (default 1m)
	scripts/fuzz.sh

SOAK ?= 10m
soak: ## soak test: mixed clients through rotations every 3s with a flaky identity endpoint, for SOAK (default 10m)
	PROXY_SOAK=$(SOAK) go test -race -count=1 -timeout 30m -run '^TestSoak$$' -v ./proxy/

stress: ## the proxy package's tests STRESS_RUNS times (default 20) with -race while two busy loops load the machine
	scripts/stress.sh

build: ## build a static bin/entra-redis-proxy, like the Dockerfile (VERSION defaults to git describe)
	CGO_ENABLED=0 go build -trimpath -ldflags "-s -w -X main.version=$(VERSION)" -o bin/entra-redis-proxy ./cmd/entra-redis-proxy

clean: ## remove build, benchmark and stress outputs (bin/, .bench/, .stress/)
	rm -rf bin .bench .stress
