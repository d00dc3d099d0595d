# fleetkey: one workspace, six modules. `make help` lists the targets.

MODULES      := certs sessionkey provisioning gateway device-agent simulator
PKGS         := $(addprefix ./,$(addsuffix /...,$(MODULES)))
BINARIES     := certs provisioning gateway device-agent simulator
GO           ?= go
STATICCHECK_VERSION := v0.8.2
TOOLS        := $(CURDIR)/.tools
STATE        ?= $(CURDIR)/.fleetkey
TRUST_DOMAIN ?= fleet.local
BENCH_COUNT  ?= 6
BENCH        ?= .
FUZZTIME     ?= 10s

.PHONY: all help build test lint bench bench-peers run up fuzz clean tidy

all: build

help:
	@echo "make run     the stack, devices enrolled with openssl + curl and with device-agent, then a 100-device simulated fleet for 60 s"
	@echo "make up      the stack alone, in the foreground, with its endpoints and the commands to use it"
	@echo "make test    every module's tests, with -race"
	@echo "make lint    gofmt, go vet, staticcheck $(STATICCHECK_VERSION), go mod tidy -diff"
	@echo "make bench   benchmarks as one table (BENCH=regexp, BENCH_COUNT=n)"
	@echo "make bench-peers  the same connect storm and load on the fleetkey gateway (fkx1, plaintext), bare mochi and Mosquitto 2"
	@echo "make build   the binaries into bin/"
	@echo "make fuzz    a short run of every fuzz target (FUZZTIME=10s)"
	@echo "make clean   remove bin/, .tools/ and $(STATE)"

build:
	@mkdir -p bin
	@for b in $(BINARIES); do $(GO) build -o bin/$$b ./$$b/cmd/$$b || exit 1; done
	@echo "built: $(addprefix bin/,$(BINARIES))"

test:
	$(GO) test -race -count=1 $(PKGS)

$(TOOLS)/staticcheck:
	GOBIN=$(TOOLS) $(GO) install honnef.co/go/tools/cmd/staticcheck@$(STATICCHECK_VERSION)

lint: $(TOOLS)/staticcheck
	@out=$$(gofmt -l $(MODULES)); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet $(PKGS)
	$(TOOLS)/staticcheck $(PKGS)
	@for m in $(MODULES); do (cd $$m && $(GO) mod tidy -diff >/dev/null) || { echo "go mod tidy needed in $$m"; exit 1; }; done

bench:
	@$(GO) test -run='^$$' -bench='$(BENCH)' -benchmem -count=$(BENCH_COUNT) $(PKGS) | tee .bench.out | awk -f scripts/benchtable.awk

bench-peers: build
	bin/simulator bench-peers --dir $(STATE)/bench-peers --json $(STATE)/bench-peers.json

fuzz:
	@FUZZTIME=$(FUZZTIME) scripts/fuzz.sh

run: build
	@STATE=$(STATE) TRUST_DOMAIN=$(TRUST_DOMAIN) scripts/run.sh

up: build
	@rm -rf $(STATE)/up && bin/simulator local --dir $(STATE)/up

tidy:
	@for m in $(MODULES); do (cd $$m && $(GO) mod tidy) || exit 1; done

clean:
	rm -rf bin $(TOOLS) $(STATE) .bench.out
