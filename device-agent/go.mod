module fleetkey.dev/device-agent

go 1.26.0

require (
	fleetkey.dev/certs v0.0.0
	fleetkey.dev/sessionkey v0.0.0-00010101000000-000000000000
	github.com/eclipse/paho.mqtt.golang v1.5.1
	github.com/smallstep/pkcs7 v0.2.3
)

require (
	github.com/google/go-tpm v0.9.8 // indirect
	github.com/google/go-tpm-tools v0.3.13-0.20230620182252-4639ecce2aba // indirect
	github.com/gorilla/websocket v1.5.3 // indirect
	golang.org/x/crypto v0.59.0 // indirect
	golang.org/x/net v0.62.0 // indirect
	golang.org/x/sync v0.17.0 // indirect
	golang.org/x/sys v0.50.0 // indirect
)

replace fleetkey.dev/certs => ../certs

replace fleetkey.dev/sessionkey => ../sessionkey
