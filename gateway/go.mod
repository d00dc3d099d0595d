module fleetkey.dev/gateway

go 1.26.0

require (
	fleetkey.dev/certs v0.0.0
	github.com/eclipse/paho.mqtt.golang v1.5.1
	github.com/mochi-mqtt/server/v2 v2.7.9
)

require (
	github.com/gorilla/websocket v1.5.3 // indirect
	github.com/rs/xid v1.4.0 // indirect
	golang.org/x/crypto v0.59.0 // indirect
	golang.org/x/net v0.62.0 // indirect
	golang.org/x/sync v0.17.0 // indirect
)

replace fleetkey.dev/certs => ../certs

replace fleetkey.dev/sessionkey => ../sessionkey
