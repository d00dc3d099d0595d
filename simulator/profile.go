package simulator

import (
	"os"
	"runtime/pprof"
)

// CPUProfileTo starts a CPU profile written to path ("": none) and returns
// what stops it and closes the file. `simulator run`, `simulator local`
// and the bench-peers gateway (peer-gateway --cpuprofile) share it.
func CPUProfileTo(path string) (stop func(), err error) {
	if path == "" {
		return func() {}, nil
	}
	f, err := os.Create(path)
	if err != nil {
		return nil, err
	}
	if err := pprof.StartCPUProfile(f); err != nil {
		f.Close()
		return nil, err
	}
	return func() { pprof.StopCPUProfile(); f.Close() }, nil
}
