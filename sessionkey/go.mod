module fleetkey.dev/sessionkey

go 1.26
