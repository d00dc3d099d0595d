module fleetkey.dev/certs

go 1.26.0

require (
	github.com/google/go-tpm v0.9.8
	github.com/rogpeppe/go-internal v1.16.0
	golang.org/x/crypto v0.59.0
)

require (
	github.com/google/go-tpm-tools v0.3.13-0.20230620182252-4639ecce2aba // indirect
	golang.org/x/sys v0.50.0 // indirect
	golang.org/x/tools v0.26.0 // indirect
)
