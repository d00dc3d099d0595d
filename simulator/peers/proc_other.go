//go:build !linux

package peers

import "syscall"

// ChildAttr is Linux's process attributes for children; none elsewhere.
func ChildAttr() *syscall.SysProcAttr { return nil }

func liftChildNofile() {}
