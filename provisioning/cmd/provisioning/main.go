// Command provisioning will be the provisioning service (EST enrollment, enrollment tokens, registry, revocation).
//
// It is not built yet (issue 3). Until then it says so and exits non-zero,
// rather than pretend to work.
package main

import (
	"fmt"
	"os"
)

func main() {
	fmt.Fprintln(os.Stderr, "provisioning: not implemented yet: the provisioning service (EST enrollment, enrollment tokens, registry, revocation) is issue 3")
	os.Exit(2)
}
