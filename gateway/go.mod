module fleetkey.dev/gateway

go 1.26.0

require fleetkey.dev/certs v0.0.0

replace fleetkey.dev/certs => ../certs

replace fleetkey.dev/sessionkey => ../sessionkey
