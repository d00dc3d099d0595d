package peers

import "syscall"

// ChildAttr has the kernel SIGKILL a child (a broker, the local stack's
// services, a service client) when the OS thread that started it exits.
// The Go runtime ends a thread only when a goroutine that locked it returns
// without unlocking, so in practice this is when this process dies: a
// crashed or killed benchmark leaves nothing behind. The child gets a
// process group of its own, so a terminal's Ctrl-C reaches only this
// process, which then stops its children in order.
func ChildAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setpgid: true}
}

// liftChildNofile lets child processes open as many files as the hard limit
// allows. Go raises its own soft RLIMIT_NOFILE at start-up but gives children
// the original soft limit back (often 1024), which would cap a broker child
// such as mosquitto at about a thousand connections. Calling Setrlimit tells
// the runtime to stop doing that; the limit set is the hard limit, which this
// process already (nearly) has.
func liftChildNofile() {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return
	}
	lim.Cur = lim.Max
	_ = syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim)
}
