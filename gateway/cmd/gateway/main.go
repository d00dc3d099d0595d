// Command gateway will be the mTLS MQTT gateway.
//
// It is not built yet (issue 4). Until then it says so and exits non-zero,
// rather than pretend to work.
package main

import (
	"fmt"
	"os"
)

func main() {
	fmt.Fprintln(os.Stderr, "gateway: not implemented yet: the mTLS MQTT gateway is issue 4")
	os.Exit(2)
}
