module fleetkey.dev/device-agent

go 1.26
