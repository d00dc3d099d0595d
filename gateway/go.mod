module fleetkey.dev/gateway

go 1.26
