module fleetkey.dev/simulator

go 1.26
