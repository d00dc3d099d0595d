// Command simulator will be the fleet simulator.
//
// It is not built yet (issue 7). Until then it says so and exits non-zero,
// rather than pretend to work.
package main

import (
	"fmt"
	"os"
)

func main() {
	fmt.Fprintln(os.Stderr, "simulator: not implemented yet: the fleet simulator is issue 7")
	os.Exit(2)
}
