package simulator

import (
	"os"
	"runtime"
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

// writeHeapProfile writes a heap profile (after a GC, so in-use figures
// are current) to path.
func writeHeapProfile(path string) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	runtime.GC()
	if err := pprof.WriteHeapProfile(f); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}
