module fleetkey.dev/provisioning

go 1.26
