// Command device-agent will be the device agent (enroll, connect, fkx1 session keys, telemetry).
//
// It is not built yet (issue 5). Until then it says so and exits non-zero,
// rather than pretend to work.
package main

import (
	"fmt"
	"os"
)

func main() {
	fmt.Fprintln(os.Stderr, "device-agent: not implemented yet: the device agent (enroll, connect, fkx1 session keys, telemetry) is issue 5")
	os.Exit(2)
}
